"""Mixtral-8x7B: 32 layers of 8 SwiGLU experts (top 2), GQA 32/8, rope theta 1e6."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 d_ff=14336, rope_theta=1e6, mlp="moe")
  c.model.moe.update(n_experts=8, top_k=2, norm_topk_prob=True, load_balance_weight=0.02)
  c.data.seq_len = 4096
  return c
