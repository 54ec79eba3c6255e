"""Llama-3-70B: 70,553,706,496 parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                 d_ff=28672, norm_eps=1e-5, rope_theta=500000.0)
  c.data.update(seq_len=8192)
  c.train.update(batch_size=256)
  return c
