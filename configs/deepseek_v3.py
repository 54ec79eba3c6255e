"""DeepSeek-V3 shapes: 61 layers (the first 3 dense, width 18,432), multi-head latent
attention (128 heads; q through rank 1536, keys and values through a 512-wide cached
latent plus a 64-wide shared RoPE key; head dims 128 + 64 for q/k, 128 for v), 256
routed experts of width 2048 (8 per token, sigmoid router over 8 groups of which 4 are
chosen, weights x 2.5, auxiliary-loss-free balancing) plus one shared expert, YaRN x40
over a 4k pre-training context: 671,026,419,200 parameters stored (the 58 x 256 routing
biases included), 37.5B active per token. The multi-token-prediction module is not
part of this model."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128,
                 head_dim=192, d_ff=18432, norm_eps=1e-6, rope_theta=10000.0, mlp="moe")
  c.model.mla.update(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128)
  c.model.moe.update(n_experts=256, top_k=8, d_ff=2048, n_shared=1, norm_topk_prob=True,
                     router="sigmoid", n_groups=8, topk_groups=4, routed_scaling=2.5,
                     first_dense=3, load_balance_weight=0.0001, router_z_weight=0.0,
                     routed_bias_update_rate=0.001)
  c.model.rope_scaling.update(type="yarn", factor=40.0, original_max_position=4096,
                              beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
  c.data.update(seq_len=4096)
  c.train.update(batch_size=256)
  return c
