"""Qwen3-30B-A3B: 48 layers of 128 experts (top 8, width 768), GQA 32/4 with head dim 128,
QK-norm, rope theta 1e6, 151,936-token vocabulary."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                 head_dim=128, d_ff=6144, qk_norm=True, rope_theta=1e6, norm_eps=1e-6,
                 mlp="moe")
  c.model.moe.update(n_experts=128, top_k=8, d_ff=768, norm_topk_prob=True,
                     load_balance_weight=0.001)
  c.data.seq_len = 4096
  return c
