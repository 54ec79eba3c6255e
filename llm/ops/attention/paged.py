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

The keys are read a block of page columns at a time (every token's j-th block of pages)
and merged by online softmax, so memory stays at about 4096 keys' worth per step whatever
the context length; the loop runs only over the blocks some token can see.
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
                    window: int | None = None, keys_per_step: int = 0):
  """[T, H, E] attention of each query token over its sequence's pages (see the module
  docstring); GQA without repeating K/V. A token that sees no key (padding: position
  -1) gets zeros. Each loop step reads `keys_per_step` keys per token (a whole number of
  pages; 0: about 4096 / T), and the loop stops after the last page any token can see."""
  t, h, e = q_THE.shape
  n, kh = k_pages_PNKE.shape[1], k_pages_PNKE.shape[2]
  m = page_table_SM.shape[1]
  g = h // kh
  q_TKGE = q_THE.reshape(t, kh, g, e)
  scale = e ** -0.5
  block = min(max((keys_per_step or 4096 // t) // n, 1), m)  # pages per loop step
  table_TM = jnp.pad(page_table_SM[seq_T], ((0, 0), (0, -m % block)))  # padded: page 0
  one_T1 = jnp.ones((t, 1), jnp.int32)  # one sequence per token: segments always match

  def body(j, carry):
    m_TKG, l_TKG, acc_TKGE = carry
    pages_TB = jax.lax.dynamic_slice_in_dim(table_TM, j * block, block, axis=1)
    k_TNKE = k_pages_PNKE[pages_TB].reshape(t, block * n, kh, e)
    v_TNKE = v_pages_PNKE[pages_TB].reshape(t, block * n, kh, e)
    kv_pos_1N = j * block * n + jnp.arange(block * n)[None, :]
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
        "tkgn,tnke->tkge", p_TKGN.astype(v_TNKE.dtype), v_TNKE,
        preferred_element_type=jnp.float32)
    return m_new, l_TKG, acc_TKGE

  init = (jnp.full((t, kh, g), -jnp.inf, jnp.float32), jnp.zeros((t, kh, g), jnp.float32),
          jnp.zeros((t, kh, g, e), jnp.float32))
  # blocks past every token's last visible key contribute nothing: the loop ends before
  # them (a dynamic trip count), and a window lets it start late
  last = jnp.max(positions_T)
  first = 0 if window is None else jnp.maximum(jnp.min(jnp.where(positions_T >= 0, positions_T,
                                                                 last)) - window + 1, 0)
  _, l_TKG, acc_TKGE = jax.lax.fori_loop(first // (block * n), last // (block * n) + 1, body,
                                         init)
  out_TKGE = acc_TKGE / jnp.where(l_TKG > 0, l_TKG, 1.0)[..., None]
  return out_TKGE.reshape(t, h, e).astype(q_THE.dtype)
