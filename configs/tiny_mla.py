"""The tiny recipe with DeepSeek-V3's layer on Shakespeare: multi-head latent attention
(4 heads, a 32-wide cached latent plus a 16-wide RoPE key, q through rank 64) and, after
one dense layer, 8 routed experts of width 96 (2 per token, sigmoid router over 4 groups
of which 2 are chosen, auxiliary-loss-free balancing) plus one shared expert."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=48,
                 d_ff=384, remat="none", tie_embeddings=False, mlp="moe")
  c.model.mla.update(kv_lora_rank=32, q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32)
  c.model.moe.update(n_experts=8, top_k=2, d_ff=96, n_shared=1, router="sigmoid", n_groups=4,
                     topk_groups=2, routed_scaling=1.0, first_dense=1, load_balance_weight=0.0,
                     router_z_weight=0.0, routed_bias_update_rate=0.001)
  c.data.update(source="shakespeare", seq_len=128)
  c.train.update(batch_size=16, steps=1200, log_every=50, eval_every=200, eval_batches=16,
                 checkpoint_every=400)
  c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
  return c
