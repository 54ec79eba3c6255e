"""Causal self-attention with GQA/MQA, packed-sequence (segment id) masking and an
optional sliding window.

Training attention goes through `llm.attention_ops.attend`, the dispatch point chosen by
`config.model.attention` ("xla" or the Pallas "flash" kernel; ring attention when the
sequence is sharded). Decoding attends over a KV cache with `cached_attention`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm import attention_ops
from llm.model.layers import Projection, RMSNorm, apply_rope, constrain, rope_inv_freq


def masked_gqa_attention(q_BTHE, k_BSKE, v_BSKE, mask_B11TS):
  """Softmax attention in fp32 under a boolean mask, K/V heads shared by groups of G query
  heads without repeating them."""
  b, t, h, e = q_BTHE.shape
  k = k_BSKE.shape[2]
  q_BTKGE = q_BTHE.reshape(b, t, k, h // k, e)
  logits_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE,
                            preferred_element_type=jnp.float32) / jnp.sqrt(e).astype(jnp.float32)
  logits_BKGTS = jnp.where(mask_B11TS, logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKE.dtype)
  return jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE).reshape(b, t, h, e)


def cached_attention(q_BTHE, k_BSKE, v_BSKE, slot, kv_valid_BS, window: int | None = None):
  """Decoding attention over a KV cache: query t sits at cache slot `slot + t` and sees
  the valid slots at or before its own (and, with a window, fewer than `window` back)."""
  q_slots_T = slot + jnp.arange(q_BTHE.shape[1])
  offset_TS = q_slots_T[:, None] - jnp.arange(k_BSKE.shape[1])[None, :]
  causal_TS = offset_TS >= 0
  if window is not None:
    causal_TS &= offset_TS < window
  mask = (causal_TS[None] & kv_valid_BS[:, None, :])[:, None, None]
  return masked_gqa_attention(q_BTHE, k_BSKE, v_BSKE, mask)


class Attention(nn.Module):
  cfg: object  # the model ConfigDict
  head_dim: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  out_init_std: float

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, decode=None):
    """With `cache` ({"k", "v"}: [B, S, K, E]) and `decode` ({"slot", "kv_valid"}), writes
    this step's keys/values at `slot` and attends over the cache; returns (out, cache)."""
    c = self.cfg
    h, k, e, d = c.n_heads, c.n_kv_heads, self.head_dim, c.d_model
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q_BTHE = Projection((d,), (h, e), ("embed", "heads", "head_dim"), init_std=c.init_std,
                        name="q", **kw)(x_BTD)
    k_BTKE = Projection((d,), (k, e), ("embed", "kv_heads", "head_dim"), init_std=c.init_std,
                        name="k", **kw)(x_BTD)
    v_BTKE = Projection((d,), (k, e), ("embed", "kv_heads", "head_dim"), init_std=c.init_std,
                        name="v", **kw)(x_BTD)
    if c.qk_norm:
      q_BTHE = RMSNorm(c.norm_eps, axis_name="head_dim", name="q_norm", **kw)(q_BTHE)
      k_BTKE = RMSNorm(c.norm_eps, axis_name="head_dim", name="k_norm", **kw)(k_BTKE)
    inv_freq = rope_inv_freq(e, c.rope_theta, c.rope_scaling)
    q_BTHE = constrain(apply_rope(q_BTHE, positions_BT, inv_freq),
                       ("batch", "length", "act_heads", "head_dim"))
    k_BTKE = constrain(apply_rope(k_BTKE, positions_BT, inv_freq),
                       ("batch", "length", "act_kv_heads", "head_dim"))
    v_BTKE = constrain(v_BTKE, ("batch", "length", "act_kv_heads", "head_dim"))
    window = c.sliding_window or None
    if cache is None:
      out_BTHE = attention_ops.attend(c.attention, q_BTHE, k_BTKE, v_BTKE, segment_ids_BT,
                                      window=window, block_q=c.flash_block_q or None,
                                      block_k=c.flash_block_k or None)
    else:
      start = (0, decode["slot"], 0, 0)
      cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_BTKE.astype(cache["k"].dtype), start),
               "v": jax.lax.dynamic_update_slice(cache["v"], v_BTKE.astype(cache["v"].dtype), start)}
      out_BTHE = cached_attention(q_BTHE, cache["k"], cache["v"], decode["slot"],
                                  decode["kv_valid"], window)
    out_BTHE = constrain(out_BTHE, ("batch", "length", "act_heads", "head_dim"))
    out_BTD = Projection((h, e), (d,), ("heads", "head_dim", "embed"),
                         init_std=self.out_init_std, name="o", **kw)(out_BTHE)
    return out_BTD, cache
