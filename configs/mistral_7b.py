"""Mistral-7B v0.1 shapes (GQA, 8 KV heads, 4096-token sliding window): 7,241,732,096
parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 d_ff=14336, norm_eps=1e-5, rope_theta=10000.0,
                 sliding_window=4096)
  c.data.update(seq_len=8192)
  c.train.update(batch_size=256)
  return c
