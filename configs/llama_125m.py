"""A GPT-2-small-sized (~124M parameter) Llama: 12 layers, width 768, tied embeddings."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 d_ff=2560, tie_embeddings=True, rope_theta=10000.0)
  c.data.update(seq_len=1024)
  c.train.update(batch_size=256, steps=10000)
  c.optim.update(lr=6e-4, warmup_steps=500)
  return c
