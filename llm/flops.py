"""Model FLOPs per trained token: the one formula behind MFU, the planner and benchmarks.

6 FLOPs per active matmul weight (forward 2, backward 4) plus the attention score and
value matmuls; active parameters exclude the input embedding lookup (untied models) and
count only the parameters a token is routed through (llm.params.active_params).
"""

from __future__ import annotations

from llm.config import head_dim
from llm.params import active_params


def attention_flops_per_token(model_cfg, seq_len: int) -> float:
  """QK^T and PV matmuls, forward and backward, averaged over a full (causal-unaware) row."""
  c = model_cfg
  return 12 * c.n_layers * seq_len * c.n_heads * head_dim(c)


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Model FLOPs to train on one token."""
  c = model_cfg
  lookup_only = 0 if c.tie_embeddings else c.vocab_size * c.d_model  # input embedding table
  return 6 * (active_params(c) - lookup_only) + attention_flops_per_token(c, seq_len)


def recomputed_flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token with the remat policy's recomputation (forward = 1/3 of
  forward+backward): "full" re-runs the whole forward, "dots_no_batch" the attention
  score/value matmuls it does not save, "dots" and "none" nothing but elementwise ops."""
  per_token = flops_per_token(model_cfg, seq_len)
  attention = attention_flops_per_token(model_cfg, seq_len)
  extra = {"none": 0.0, "dots": 0.0, "dots_no_batch": attention / 3, "full": per_token / 3,
           "offload": per_token / 3}
  return per_token + extra[model_cfg.remat]
