"""Paged attention in plain XLA: a flat, ragged batch of query tokens attends over the
KV pages of its sequences. It runs everywhere and is the reference the serving engine's
kernels are checked against.

Layout (as vLLM's and tpu-inference's ragged paged attention): per layer, K and V pages
[num_pages, page_size, K, E]; a page table [S, M] of page ids per sequence (padded with
page 0, which nothing is written to for a sequence); and per query token its sequence and
its position in it. A token at position p sees its sequence's keys at positions <= p
(and > p - window), by the one masking rule (pallas_kernels.flash_attention.common);
so a sequence's keys up to its last query token must be written before attending, as
`write_pages` does for the step's own tokens.

The keys are read a page column at a time (every token's j-th page) and merged by online
softmax, so memory stays at [T, page_size, K, E] per step whatever the context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels.flash_attention as flash


def write_pages(k_pages_PNKE, v_pages_PNKE, k_TKE, v_TKE, page_T, slot_T):
  """The pages with each token's key and value written at (its page, its slot). Padding
  tokens are pointed at page 0."""
  return (k_pages_PNKE.at[page_T, slot_T].set(k_TKE.astype(k_pages_PNKE.dtype)),
          v_pages_PNKE.at[page_T, slot_T].set(v_TKE.astype(v_pages_PNKE.dtype)))


def paged_attention(q_THE, k_pages_PNKE, v_pages_PNKE, seq_T, positions_T, page_table_SM,
                    window: int | None = None):
  """[T, H, E] attention of each query token over its sequence's pages (see the module
  docstring); GQA without repeating K/V. A token that sees no key (padding: position
  -1) gets zeros."""
  t, h, e = q_THE.shape
  n, kh = k_pages_PNKE.shape[1], k_pages_PNKE.shape[2]
  q_TKGE = q_THE.reshape(t, kh, h // kh, e)
  scale = e ** -0.5
  pages_TM = page_table_SM[seq_T]
  one_T1 = jnp.ones((t, 1), jnp.int32)  # one sequence per token: segments always match

  def page_column(carry, j):
    m_TKG, l_TKG, acc_TKGE = carry
    k_TNKE, v_TNKE = k_pages_PNKE[pages_TM[:, j]], v_pages_PNKE[pages_TM[:, j]]
    kv_pos_1N = j * n + jnp.arange(n)[None, :]
    visible_TN = flash.attention_mask(positions_T[:, None], kv_pos_1N, one_T1, one_T1,
                                      causal=True, window=window)
    s_TKGN = jnp.einsum("tkge,tnke->tkgn", q_TKGE, k_TNKE,
                        preferred_element_type=jnp.float32) * scale
    s_TKGN = jnp.where(visible_TN[:, None, None, :], s_TKGN, -jnp.inf)
    m_new = jnp.maximum(m_TKG, s_TKGN.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p_TKGN = jnp.exp(s_TKGN - m_safe[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(m_TKG), m_TKG, m_safe) - m_safe)
    l_TKG = l_TKG * correction + p_TKGN.sum(axis=-1)
    acc_TKGE = acc_TKGE * correction[..., None] + jnp.einsum(
        "tkgn,tnke->tkge", p_TKGN, v_TNKE, preferred_element_type=jnp.float32)
    return (m_new, l_TKG, acc_TKGE), None

  g = h // kh
  init = (jnp.full((t, kh, g), -jnp.inf, jnp.float32), jnp.zeros((t, kh, g), jnp.float32),
          jnp.zeros((t, kh, g, e), jnp.float32))
  # columns past every token's last visible page contribute nothing: skip them
  last_column = jnp.max(positions_T) // n
  (_, l_TKG, acc_TKGE), _ = jax.lax.scan(
      lambda c, j: jax.lax.cond(j <= last_column, page_column, lambda c_, _: (c_, None), c, j),
      init, jnp.arange(page_table_SM.shape[1]))
  out_TKGE = acc_TKGE / jnp.where(l_TKG > 0, l_TKG, 1.0)[..., None]
  return out_TKGE.reshape(t, h, e).astype(q_THE.dtype)
