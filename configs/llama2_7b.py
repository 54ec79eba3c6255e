"""Llama-2-7B (Touvron et al., 2023): 6,738,415,616 parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                 d_ff=11008, norm_eps=1e-5, rope_theta=10000.0)
  c.data.update(seq_len=4096)
  c.train.update(batch_size=256)
  return c
