"""Causal self-attention with GQA/MQA, packed-sequence (segment id) masking and an
optional sliding window.

All attention, training and cached decoding alike, goes through
`llm.ops.attention.attend`, the dispatch chosen by `config.model.attention` ("xla" or
the Pallas "flash" kernel; ring attention when the sequence is sharded).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm.ops.attention import attend, attend_cached, attend_paged
from llm.model.layers import Projection, RMSNorm, apply_rope, constrain, rope_inv_freq
from llm.model.lora import projection_kwargs


class Attention(nn.Module):
  cfg: object  # the model ConfigDict
  head_dim: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  out_init_std: float

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, decode=None):
    """With `cache` ({"k", "v"}: [B, K, S, E], heads-major) and `decode` ({"slot",
    "kv_valid"}), writes this step's keys/values at `slot` and attends over the cache;
    returns (out, cache). With KV pages ({"kv"}: [P, N, 2K, E]) and a paged `decode`
    (llm.ops.attention.attend_paged), the batch is one flat row of tokens [1, T]."""
    c = self.cfg
    h, k, e, d = c.n_heads, c.n_kv_heads, self.head_dim, c.d_model
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dict(kw, use_bias=c.qkv_bias)
    q_BTHE = Projection((d,), (h, e), ("embed", "heads", "head_dim"), init_std=c.init_std,
                        name="q", **qkv, **projection_kwargs(c, "q"))(x_BTD)
    k_BTKE = Projection((d,), (k, e), ("embed", "kv_heads", "head_dim"), init_std=c.init_std,
                        name="k", **qkv, **projection_kwargs(c, "k"))(x_BTD)
    v_BTKE = Projection((d,), (k, e), ("embed", "kv_heads", "head_dim"), init_std=c.init_std,
                        name="v", **qkv, **projection_kwargs(c, "v"))(x_BTD)
    if c.qk_norm:
      q_BTHE = RMSNorm(c.norm_eps, axis_name="head_dim", name="q_norm", **kw)(q_BTHE)
      k_BTKE = RMSNorm(c.norm_eps, axis_name="head_dim", name="k_norm", **kw)(k_BTKE)
    inv_freq = rope_inv_freq(e, c.rope_theta, c.rope_scaling)
    q_BTHE = constrain(apply_rope(q_BTHE, positions_BT, inv_freq),
                       ("batch", "length", "act_heads", "head_dim"))
    k_BTKE = constrain(apply_rope(k_BTKE, positions_BT, inv_freq),
                       ("batch", "length", "act_kv_heads", "head_dim"))
    v_BTKE = constrain(v_BTKE, ("batch", "length", "act_kv_heads", "head_dim"))
    options = dict(window=c.sliding_window or None, block_q=c.flash_block_q or None,
                   block_k=c.flash_block_k or None)
    if cache is None:
      out_BTHE = attend(c.attention, q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, **options)
    elif "page_table" in decode:  # serving: one flat row of tokens over KV pages
      out_THE, cache = attend_paged(c.attention, q_BTHE[0], k_BTKE[0], v_BTKE[0], cache,
                                    decode, window=options["window"])
      out_BTHE = out_THE[None]
    else:  # queries at cache slots slot.., over the cache's filled (kv_valid) slots
      out_BTHE, cache = attend_cached(c.attention, q_BTHE, k_BTKE, v_BTKE, cache,
                                      decode["kv_valid"], decode["slot"], **options)
    out_BTHE = constrain(out_BTHE, ("batch", "length", "act_heads", "head_dim"))
    out_BTD = Projection((h, e), (d,), ("heads", "head_dim", "embed"),
                         init_std=self.out_init_std, name="o", **kw,
                         **projection_kwargs(c, "o"))(out_BTHE)
    return out_BTD, cache
