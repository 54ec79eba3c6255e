"""Llama-3-8B (GQA, 128k vocab, theta 500k): 8,030,261,248 parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 d_ff=14336, norm_eps=1e-5, rope_theta=500000.0)
  c.data.update(seq_len=8192)
  c.train.update(batch_size=256)
  return c
