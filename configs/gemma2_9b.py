"""Gemma-2-9B shapes: 42 layers alternating local (4096-token window) and global attention,
GQA 16/8 with head dim 256, attention logits soft-capped at 50 and final logits at 30,
norms before and after attention and MLP, GeGLU, embeddings x sqrt(d_model), tied
256,000-token vocabulary: 9,241,705,984 parameters."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8,
                 head_dim=256, d_ff=14336, norm_eps=1e-6, rope_theta=10000.0,
                 tie_embeddings=True, norm_plus_one=True, post_norms=True, embed_scale=True,
                 mlp_activation="gelu_tanh", attn_logit_softcap=50.0, final_logit_softcap=30.0,
                 query_pre_attn_scalar=256.0, sliding_window=4096, sliding_window_pattern=2)
  c.data.update(seq_len=8192)
  c.train.update(batch_size=256)
  return c
