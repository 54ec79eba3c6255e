"""Causal self-attention with GQA/MQA, packed-sequence (segment id) masking, an
optional sliding window (on every layer, or on the local layers of a local/global
pattern, with their own RoPE base), and optional logit soft-capping (Gemma 2).

All attention, training and cached decoding alike, goes through
`llm.ops.attention.attend`, the dispatch chosen by `config.model.attention` ("xla" or
the Pallas "flash" kernel; ring attention when the sequence is sharded).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from llm.config import attention_width
from llm.ops.attention import attend, attend_cached, attend_paged
from llm.model.layers import (Projection, RMSNorm, apply_rope, constrain, norm, param_with_axes,
                              rope_frequencies, yarn_mscale)
from llm.model.lora import projection_kwargs


class Attention(nn.Module):
  cfg: object  # the model ConfigDict
  head_dim: int
  local: bool  # a sliding-window layer (layer_kinds)
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
      q_BTHE = norm(c, "q_norm", axis_name="head_dim", **kw)(q_BTHE)
      k_BTKE = norm(c, "k_norm", axis_name="head_dim", **kw)(k_BTKE)
    own_rope = self.local and c.rope_local_theta  # Gemma 3's local layers: unscaled
    inv_freq, cos_sin_factor = rope_frequencies(
        e, c.rope_local_theta if own_rope else c.rope_theta,
        None if own_rope else c.rope_scaling, positions_BT)
    if c.query_pre_attn_scalar and c.query_pre_attn_scalar != e:
      # the kernels scale logits by 1/sqrt(head dim); Gemma scales by 1/sqrt(this)
      q_BTHE = q_BTHE * jnp.asarray(math.sqrt(e / c.query_pre_attn_scalar), q_BTHE.dtype)
    q_BTHE = constrain(apply_rope(q_BTHE, positions_BT, inv_freq, cos_sin_factor),
                       ("batch", "length", "act_heads", "head_dim"))
    k_BTKE = constrain(apply_rope(k_BTKE, positions_BT, inv_freq, cos_sin_factor),
                       ("batch", "length", "act_kv_heads", "head_dim"))
    v_BTKE = constrain(v_BTKE, ("batch", "length", "act_kv_heads", "head_dim"))
    window = c.sliding_window if self.local else None
    softcap = c.attn_logit_softcap or None
    options = dict(window=window, softcap=softcap, block_q=c.flash_block_q or None,
                   block_k=c.flash_block_k or None)
    if cache is None:
      out_BTHE = attend(c.attention, q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, **options)
    elif "page_table" in decode:  # serving: one flat row of tokens over KV pages
      out_THE, cache = attend_paged(c.attention, q_BTHE[0], k_BTKE[0], v_BTKE[0], cache,
                                    decode, window=window, softcap=softcap)
      out_BTHE = out_THE[None]
    else:  # queries at cache slots slot.., over the cache's filled (kv_valid) slots
      out_BTHE, cache = attend_cached(c.attention, q_BTHE, k_BTKE, v_BTKE, cache,
                                      decode["kv_valid"], decode["slot"], **options)
    out_BTHE = constrain(out_BTHE, ("batch", "length", "act_heads", "head_dim"))
    out_BTD = Projection((h, e), (d,), ("heads", "head_dim", "embed"),
                         init_std=self.out_init_std, name="o", **kw,
                         **projection_kwargs(c, "o"))(out_BTHE)
    return out_BTD, cache


MLA_NORM_EPS = 1e-6  # DeepSeek's norms on the low-rank q and kv (transformers' default)


def mla_scale(c) -> float:
  """MLA's logit scale: 1/sqrt(qk head dim), times YaRN's mscale(mscale_all_dim)^2 when
  RoPE is YaRN-scaled (DeepSeek's softmax_scale)."""
  scale = (c.mla.qk_nope_head_dim + c.mla.qk_rope_head_dim) ** -0.5
  r = c.rope_scaling
  if r.type == "yarn" and r.mscale_all_dim:
    scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
  return scale


class Weight(nn.Module):
  """A kernel MLA uses whole (`spec` and `x`: the einsum of x with it, in this module, so
  quantized training takes it as a projection) or, called bare, split and absorbed into
  q and o."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: jnp.dtype
  init_std: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, spec: str | None = None, x=None):
    kernel = param_with_axes(self, "kernel", nn.initializers.normal(self.init_std), self.shape,
                             self.axes, self.param_dtype).astype(self.dtype)
    return kernel if spec is None else jnp.einsum(spec, x, kernel)


class LatentAttention(nn.Module):
  """Multi-head latent attention (DeepSeek-V2/V3, `model.mla.kv_lora_rank` > 0).

  Queries: x -> q_a (rank q_lora_rank) -> norm -> q_b -> [H, nope + rope] (or one q
  projection when q_lora_rank = 0). Keys and values: x -> kv_a -> (latent c [r], one
  RoPE key [rope] shared by all heads); c -> norm -> kv_b -> per head (k_nope [nope],
  v [v_head_dim]); a head's key is (k_nope, RoPE key).

  Training and prefill without a cache expand c into per-head keys and values and run
  the model's attention implementation (values zero-padded to the key width). With a
  cache, the projections are absorbed: a query's nope part times kv_b's key half gives
  a query over the latent, so scores are q_latent . c + q_rope . k_rope, and the output
  over the latent times kv_b's value half gives each head's value. The cache then holds
  (c, k_rope), r + rope values per token and layer, as one key "head" that is its own
  value ({"k"} only; pages of one vector per token).
  """
  cfg: object
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  out_init_std: float

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, decode=None):
    c, m = self.cfg, self.cfg.mla
    h, d = c.n_heads, c.d_model
    nope, rope, dv, r = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if m.q_lora_rank:
      q_BTR = Projection((d,), (m.q_lora_rank,), ("embed", "latent"), init_std=c.init_std,
                         name="q_a", **kw)(x_BTD)
      q_BTR = RMSNorm(MLA_NORM_EPS, name="q_a_norm", **kw)(q_BTR)
      q_BTHE = Projection((m.q_lora_rank,), (h, nope + rope), ("latent", "heads", "head_dim"),
                          init_std=c.init_std, name="q_b", **kw)(q_BTR)
    else:
      q_BTHE = Projection((d,), (h, nope + rope), ("embed", "heads", "head_dim"),
                          init_std=c.init_std, name="q", **kw)(x_BTD)
    kv_BTL = Projection((d,), (r + rope,), ("embed", "latent"), init_std=c.init_std,
                        name="kv_a", **kw)(x_BTD)
    c_BTR = RMSNorm(MLA_NORM_EPS, name="kv_a_norm", **kw)(kv_BTL[..., :r])
    inv_freq, cos_sin_factor = rope_frequencies(rope, c.rope_theta, c.rope_scaling, positions_BT)
    q_rope_BTHE = apply_rope(q_BTHE[..., nope:], positions_BT, inv_freq, cos_sin_factor)
    k_rope_BT1E = apply_rope(kv_BTL[:, :, None, r:], positions_BT, inv_freq, cos_sin_factor)
    kv_b = Weight((r, h, nope + dv), ("latent", "heads", "head_dim"), self.param_dtype,
                  c.init_std, self.dtype, name="kv_b")
    scale = mla_scale(c)
    if cache is None:  # expanded: per-head keys and values
      kv_BTHF = kv_b("btr,rhf->bthf", c_BTR)
      k_BTHE = jnp.concatenate(
          [kv_BTHF[..., :nope], jnp.broadcast_to(k_rope_BT1E, (*kv_BTHF.shape[:3], rope))], -1)
      width = attention_width(c)  # the kernels scale by 1/sqrt(width): undone in q
      q_BTHE = jnp.concatenate([q_BTHE[..., :nope], q_rope_BTHE], -1)
      q_BTHE = q_BTHE * jnp.asarray(scale * math.sqrt(width), q_BTHE.dtype)
      v_BTHF = kv_BTHF[..., nope:]
      pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731
      q_BTHE, k_BTHE, v_BTHF = (constrain(pad(x), ("batch", "length", "act_heads", "head_dim"))
                                for x in (q_BTHE, k_BTHE, v_BTHF))
      out_BTHE = attend(c.attention, q_BTHE, k_BTHE, v_BTHF, segment_ids_BT,
                        block_q=c.flash_block_q or None, block_k=c.flash_block_k or None)
      out_BTHV = out_BTHE[..., :dv]
    else:  # absorbed, over the cached (latent, RoPE key)
      kv_b_RHF = kv_b()
      q_BTHR = jnp.einsum("bthn,rhn->bthr", q_BTHE[..., :nope], kv_b_RHF[..., :nope])
      q_BTHL = jnp.concatenate([q_BTHR, q_rope_BTHE], -1)
      q_BTHL = q_BTHL * jnp.asarray(scale * math.sqrt(r + rope), q_BTHL.dtype)
      k_BT1L = jnp.concatenate([c_BTR[:, :, None], k_rope_BT1E], -1)
      if "page_table" in decode:
        out_THL, cache = attend_paged(c.attention, q_BTHL[0], k_BT1L[0], k_BT1L[0], cache,
                                      decode)
        out_BTHL = out_THL[None]
      else:
        out_BTHL, cache = attend_cached(c.attention, q_BTHL, k_BT1L, k_BT1L, cache,
                                        decode["kv_valid"], decode["slot"])
      out_BTHV = jnp.einsum("bthr,rhv->bthv", out_BTHL[..., :r], kv_b_RHF[..., nope:])
    out_BTHV = constrain(out_BTHV.astype(self.dtype), ("batch", "length", "act_heads", "head_dim"))
    out_BTD = Projection((h, dv), (d,), ("heads", "head_dim", "embed"),
                         init_std=self.out_init_std, name="o", **kw)(out_BTHV)
    return out_BTD, cache
