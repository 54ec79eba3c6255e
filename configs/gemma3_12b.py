"""Gemma-3-12B (text) shapes: 48 layers, five local (1024-token window, RoPE base 10k) to
one global (RoPE base 1M, linear scaling x8 for the 128k context), GQA 16/8 with head
dim 256, QK-norm, norms before and after attention and MLP, GeGLU, embeddings x
sqrt(d_model), tied 262,208-token vocabulary, no soft-capping: 11,766,034,176 parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=262208, d_model=3840, n_layers=48, n_heads=16, n_kv_heads=8,
                 head_dim=256, d_ff=15360, norm_eps=1e-6, rope_theta=1e6,
                 rope_local_theta=10000.0, tie_embeddings=True, qk_norm=True,
                 norm_plus_one=True, post_norms=True, embed_scale=True,
                 mlp_activation="gelu_tanh", query_pre_attn_scalar=256.0,
                 sliding_window=1024, sliding_window_pattern=6)
  c.model.rope_scaling.update(type="linear", factor=8.0)
  c.data.update(seq_len=8192)
  c.train.update(batch_size=256)
  return c
