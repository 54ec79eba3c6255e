"""Llama-2-13B: 13,015,864,320 parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                 d_ff=13824, norm_eps=1e-5, rope_theta=10000.0)
  c.data.update(seq_len=4096)
  c.train.update(batch_size=256)
  return c
