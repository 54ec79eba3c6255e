"""Attention in plain XLA: chunk functions (forward -> (out, lse), backward -> (dq, dk,
dv)) for one (query chunk, key chunk) pair at given position offsets, causal within
segments with an optional window; GQA without repeating K/V. Used whole (GSPMD
partitions it), as ring-attention chunks, and for cached decoding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels.flash_attention as flash
from llm.ops.softcap import soft_cap, soft_cap_grad


class Blocks(NamedTuple):
  """One (query chunk, key chunk) step: forward -> (out, lse); backward -> (dq, dk, dv)."""
  fwd: Callable
  bwd: Callable



def _chunk_mask(qseg_BT, kvseg_BS, q_offset, kv_offset, window):
  """[B, T, S] causal visibility by the one masking rule (flash.attention_mask)."""
  t, s = qseg_BT.shape[1], kvseg_BS.shape[1]
  q_pos_1T1 = q_offset + jnp.arange(t)[None, :, None]
  kv_pos_11S = kv_offset + jnp.arange(s)[None, None, :]
  return flash.attention_mask(q_pos_1T1, kv_pos_11S, qseg_BT[:, :, None], kvseg_BS[:, None, :],
                              causal=True, window=window)


def _grouped_logits(q_BTHE, k_BSKE, scale, kv="bske"):
  """[B, K, G, T, S] logits; `kv` names the key layout ("bkse": a heads-major KV cache)."""
  b, t, h, e = q_BTHE.shape
  kh = k_BSKE.shape[kv.index("k")]
  q_BTKGE = q_BTHE.reshape(b, t, kh, h // kh, e)
  return jnp.einsum(f"btkge,{kv}->bkgts", q_BTKGE, k_BSKE,
                    preferred_element_type=jnp.float32) * scale


def _weighted_values(p_BKGTS, v_BSKE, kv="bske"):
  """[B, T, K, G, E] float32 sum over s of p x v. With a heads-major cache the product is
  written as p [.., S] @ v [S, E] per (b, k) (jnp.einsum lets XLA put v first, and XLA then
  transposes the whole cache at every decode step to contract its last axis)."""
  if kv == "bske":
    return jnp.einsum("bkgts,bske->btkge", p_BKGTS, v_BSKE, preferred_element_type=jnp.float32)
  b, k, g, t, s = p_BKGTS.shape
  o_BKGTE = jax.lax.dot_general(p_BKGTS.reshape(b, k, g * t, s), v_BSKE,
                                (((3,), (2,)), ((0, 1), (0, 1))),
                                preferred_element_type=jnp.float32)
  return o_BKGTE.reshape(b, k, g, t, -1).transpose(0, 3, 1, 2, 4)


def xla_blocks(window: int | None, kv: str = "bske", softcap: float | None = None) -> Blocks:
  """Chunk functions in plain XLA, causal with segment ids and an optional window;
  GQA without repeating K/V. `kv="bkse"`: the forward takes keys and values heads-major
  ([B, K, S, E], a KV cache laid out so a decode step reads each head contiguously).
  `softcap`: logits cap x tanh(s / cap) (the backward through the cap's derivative)."""

  def fwd(q_BTHE, k_BSKE, v_BSKE, qseg_BT, kvseg_BS, q_offset, kv_offset):
    b, t, h, e = q_BTHE.shape
    mask_B11TS = _chunk_mask(qseg_BT, kvseg_BS, q_offset, kv_offset, window)[:, None, None]
    s_BKGTS = jnp.where(mask_B11TS, soft_cap(_grouped_logits(q_BTHE, k_BSKE, e ** -0.5, kv),
                                             softcap), flash.EMPTY_LSE)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - m_BKGT[..., None]), 0.0)
    l_BKGT = jnp.sum(p_BKGTS, axis=-1)
    safe_l = jnp.where(l_BKGT == 0, 1.0, l_BKGT)
    o_BTKGE = _weighted_values(p_BKGTS.astype(v_BSKE.dtype), v_BSKE, kv)
    o_BTKGE = o_BTKGE / safe_l.transpose(0, 3, 1, 2)[..., None]
    lse_BKGT = jnp.where(l_BKGT == 0, flash.EMPTY_LSE, m_BKGT + jnp.log(safe_l))
    return (o_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype),
            lse_BKGT.reshape(b, h, t))

  def bwd(q_BTHE, k_BSKE, v_BSKE, qseg_BT, kvseg_BS, q_offset, kv_offset, lse_BHT, delta_BHT,
          do_BTHE):
    b, t, h, e = q_BTHE.shape
    kh = k_BSKE.shape[2]
    g = h // kh
    scale = e ** -0.5
    mask_B11TS = _chunk_mask(qseg_BT, kvseg_BS, q_offset, kv_offset, window)[:, None, None]
    s_BKGTS = soft_cap(_grouped_logits(q_BTHE, k_BSKE, scale), softcap)
    p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - lse_BHT.reshape(b, kh, g, t)[..., None]),
                        0.0)
    do_BTKGE = do_BTHE.reshape(b, t, kh, g, e)
    dv_BSKE = jnp.einsum("bkgts,btkge->bske", p_BKGTS.astype(do_BTHE.dtype), do_BTKGE,
                         preferred_element_type=jnp.float32)
    dp_BKGTS = jnp.einsum("btkge,bske->bkgts", do_BTKGE, v_BSKE,
                          preferred_element_type=jnp.float32)
    ds_BKGTS = soft_cap_grad(
        p_BKGTS * (dp_BKGTS - delta_BHT.reshape(b, kh, g, t)[..., None]) * scale, s_BKGTS,
        softcap)
    dq_BTKGE = jnp.einsum("bkgts,bske->btkge", ds_BKGTS.astype(k_BSKE.dtype), k_BSKE,
                          preferred_element_type=jnp.float32)
    dk_BSKE = jnp.einsum("bkgts,btkge->bske", ds_BKGTS.astype(q_BTHE.dtype),
                         q_BTHE.reshape(b, t, kh, g, e), preferred_element_type=jnp.float32)
    return (dq_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype), dk_BSKE.astype(k_BSKE.dtype),
            dv_BSKE.astype(v_BSKE.dtype))

  return Blocks(fwd, bwd)


def xla_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, window: int | None = None,
                  kv_segment_ids_BS=None, q_offset=0, softcap: float | None = None):
  """Softmax in fp32, causal within each segment, optional window and logit soft-cap.
  Queries sit at positions q_offset + t, keys at s (cached decoding: kv segment 0 marks
  empty slots)."""
  kvseg = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
  out, _ = xla_blocks(window, softcap=softcap).fwd(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kvseg, q_offset, 0)
  return out
