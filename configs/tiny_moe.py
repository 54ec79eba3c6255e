"""The tiny recipe with mixture-of-experts feed-forwards on Shakespeare: 8 SwiGLU experts
of width 96, 2 per token (768 total width, 192 active per token)."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                 remat="none", tie_embeddings=True, mlp="moe")
  c.model.moe.update(n_experts=8, top_k=2, d_ff=96)
  c.data.update(source="shakespeare", seq_len=128)
  c.train.update(batch_size=16, steps=1200, log_every=50, eval_every=200, eval_batches=16,
                 checkpoint_every=400)
  c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
  return c
