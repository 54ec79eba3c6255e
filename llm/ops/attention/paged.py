"""Ragged paged attention: a flat batch of query tokens from many sequences (prefill
chunks and decode tokens mixed) attends over each sequence's KV pages.

Layout and arguments are those of JAX's TPU kernel
(jax.experimental.pallas.ops.tpu.ragged_paged_attention), so one page pool serves both:
  - kv_pages [P, N, 2K, E]: per page of N tokens, K and V heads interleaved (key head i at
    2i, value head i at 2i + 1);
  - page_table [S, M]: each sequence's page ids (padding: page 0, never written for one);
  - cu_q_lens [S + 1]: sequence s's queries are tokens cu_q_lens[s]:cu_q_lens[s + 1], in
    order, the last ones of its kv_lens[s] tokens (so its first query sits at position
    kv_lens[s] - q_len); num_seqs [1]: how many rows are real.
A query at position p sees its sequence's keys at positions <= p (and > p - window), by
the one masking rule (pallas_kernels.flash_attention.common).
Its own key must already be in the pages: `write_pages` writes the step's tokens first.
Tokens past cu_q_lens[num_seqs] are padding and get zeros.

`paged_attention` is plain XLA, runs everywhere and is the reference; it walks the rows,
a block of queries at a time (one query for a decode row), and each block reads only its
own sequence's pages, a block of pages at a time, merged by online softmax: the reads are
the keys each sequence has, not one copy per query token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels.flash_attention as flash
from llm.ops.softcap import soft_cap

KEYS_PER_BLOCK = 256  # keys a block of prefill queries reads per inner step
DECODE_KEYS_PER_BLOCK = 64  # keys a decode query reads per inner step (less overshoot)
QUERIES_PER_BLOCK = 64  # prefill queries per block


def combine_kv(k_TKE, v_TKE):
  """[T, 2K, E]: key and value heads interleaved, the pages' layout."""
  t, kh, e = k_TKE.shape
  return jnp.stack([k_TKE, v_TKE], axis=2).reshape(t, 2 * kh, e)


def split_kv(kv_NCE, shared: bool = False):
  """The interleaved [..., 2K, E] as (keys, values), each [..., K, E] (shared: [..., K, E]
  keys that are their own values)."""
  if shared:
    return kv_NCE, kv_NCE
  *lead, c, e = kv_NCE.shape
  kv = kv_NCE.reshape(*lead, c // 2, 2, e)
  return kv[..., 0, :], kv[..., 1, :]


def quantize_kv(x_XE):
  """int8 values and f32 scales [...] of key/value vectors [..., E]: symmetric, one scale
  per token and head (max |x| / 127), the int8 KV cache's storage."""
  x = x_XE.astype(jnp.float32)
  scale_X = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale_X = jnp.where(scale_X > 0, scale_X, 1.0)
  q = jnp.clip(jnp.round(x / scale_X[..., None]), -127, 127).astype(jnp.int8)
  return q, scale_X


def dequantize_kv(q_XE, scale_X, dtype):
  return (q_XE.astype(jnp.float32) * scale_X[..., None]).astype(dtype)


def write_pages(kv_pages_PNCE, k_TKE, v_TKE, page_T, slot_T, kv_scale_PNC=None):
  """The pages with each token's key and value written at (its page, its slot). Padding
  tokens are pointed at page 0. With `kv_scale_PNC` the pages are int8 (quantize_kv):
  returns (pages, scales). v_TKE None: the keys alone (keys that are their own values)."""
  kv_TCE = k_TKE if v_TKE is None else combine_kv(k_TKE, v_TKE)
  if kv_scale_PNC is None:
    return kv_pages_PNCE.at[page_T, slot_T].set(kv_TCE.astype(kv_pages_PNCE.dtype),
                                                mode="promise_in_bounds")
  q_TCE, scale_TC = quantize_kv(kv_TCE)
  return (kv_pages_PNCE.at[page_T, slot_T].set(q_TCE, mode="promise_in_bounds"),
          kv_scale_PNC.at[page_T, slot_T].set(scale_TC, mode="promise_in_bounds"))


def paged_attention(q_THE, kv_pages_PNCE, kv_lens_S, page_table_SM, cu_q_lens_S1, num_seqs_1,
                    *, window: int | None = None, keys_per_block: int = 0,
                    queries_per_block: int = 0, decode_keys_per_block: int = 0,
                    kv_scale_PNC=None, softcap: float | None = None, shared_kv: bool = False):
  """[T, H, E] ragged paged attention (see the module docstring); GQA without repeating
  K/V. Each inner step reads `keys_per_block` keys (rounded to whole pages; 0:
  KEYS_PER_BLOCK) of one sequence for a block of `queries_per_block` of its queries (0:
  QUERIES_PER_BLOCK), or `decode_keys_per_block` (0: DECODE_KEYS_PER_BLOCK) for a row's
  single (decode) query. int8 pages come with their scales (`kv_scale_PNC`) and are
  dequantized block by block as they are read. `softcap`: logits cap x tanh(s / cap).
  `shared_kv`: pages [P, N, K, E] of keys that are their own values (MLA's latent)."""
  t, h, e = q_THE.shape
  n, c = kv_pages_PNCE.shape[1], kv_pages_PNCE.shape[2]
  kh = c if shared_kv else c // 2
  g = h // kh
  m = page_table_SM.shape[1]
  bq = min(queries_per_block or QUERIES_PER_BLOCK, t)
  scale = e ** -0.5
  # padded so that no dynamic slice is clamped back into the array
  table_SM = jnp.pad(page_table_SM, ((0, 0), (0, m)))
  q_pad = jnp.pad(q_THE, ((0, bq), (0, 0), (0, 0)))
  out0 = jnp.zeros((t + bq, h, e), q_THE.dtype)

  def query_block(size, keys_wanted):
    """Attention of `size` queries of row s starting at its query i0, written into out;
    keys read `keys_wanted` at a time (whole pages)."""
    pages_per_block = min(max(keys_wanted // n, 1), m)
    keys = pages_per_block * n

    def run(s, i0, out):
      start, q_len, kv_len = cu_q_lens_S1[s], cu_q_lens_S1[s + 1] - cu_q_lens_S1[s], kv_lens_S[s]
      q_QKGE = jax.lax.dynamic_slice_in_dim(q_pad, start + i0, size).reshape(size, kh, g, e)
      qi_Q = i0 + jnp.arange(size)
      valid_Q = qi_Q < q_len
      pos_Q = kv_len - q_len + qi_Q

      def kv_block(j, carry):
        m_KGQ, l_KGQ, acc_KGQE = carry
        pages_B = jax.lax.dynamic_slice_in_dim(table_SM[s], j * pages_per_block,
                                               pages_per_block)
        # page ids are in range by construction: no out-of-bounds handling (faster on CPU)
        kv_BNCE = kv_pages_PNCE.at[pages_B].get(mode="promise_in_bounds")
        if kv_scale_PNC is not None:
          kv_BNCE = dequantize_kv(kv_BNCE, kv_scale_PNC.at[pages_B].get(
              mode="promise_in_bounds"), q_THE.dtype)
        k_NKE, v_NKE = split_kv(kv_BNCE.reshape(keys, c, e), shared_kv)
        kpos_N = j * keys + jnp.arange(keys)
        # one sequence per block: segments always match
        visible_QN = flash.attention_mask(pos_Q[:, None], kpos_N[None, :], 0, 0, causal=True,
                                          window=window)
        s_KGQN = soft_cap(jnp.einsum("qkge,nke->kgqn", q_QKGE, k_NKE,
                                     preferred_element_type=jnp.float32) * scale, softcap)
        s_KGQN = jnp.where(visible_QN, s_KGQN, -jnp.inf)
        m_new = jnp.maximum(m_KGQ, s_KGQN.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p_KGQN = jnp.exp(s_KGQN - m_safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m_KGQ), m_KGQ, m_safe) - m_safe)
        l_KGQ = l_KGQ * correction + p_KGQN.sum(axis=-1)
        acc_KGQE = acc_KGQE * correction[..., None] + jnp.einsum(
            "kgqn,nke->kgqe", p_KGQN.astype(v_NKE.dtype), v_NKE,
            preferred_element_type=jnp.float32)
        return m_new, l_KGQ, acc_KGQE

      init = (jnp.full((kh, g, size), -jnp.inf, jnp.float32),
              jnp.zeros((kh, g, size), jnp.float32), jnp.zeros((kh, g, size, e), jnp.float32))
      last = jnp.minimum(kv_len - q_len + i0 + size, kv_len) - 1  # the last key it sees
      first = 0 if window is None else jnp.maximum(kv_len - q_len + i0 - window + 1, 0)
      _, l_KGQ, acc_KGQE = jax.lax.fori_loop(first // keys, last // keys + 1, kv_block, init)
      o_KGQE = acc_KGQE / jnp.where(l_KGQ > 0, l_KGQ, 1.0)[..., None]
      o_QHE = o_KGQE.transpose(2, 0, 1, 3).reshape(size, h, e).astype(out.dtype)
      current = jax.lax.dynamic_slice_in_dim(out, start + i0, size)
      o_QHE = jnp.where(valid_Q[:, None, None], o_QHE, current)
      return jax.lax.dynamic_update_slice_in_dim(out, o_QHE, start + i0, axis=0)

    return run

  decode_query = query_block(1, decode_keys_per_block or DECODE_KEYS_PER_BLOCK)
  prefill_block = query_block(bq, keys_per_block or KEYS_PER_BLOCK)

  def row(s, out):
    q_len = cu_q_lens_S1[s + 1] - cu_q_lens_S1[s]

    def prefill(out):
      return jax.lax.fori_loop(0, (q_len + bq - 1) // bq,
                               lambda b, o: prefill_block(s, b * bq, o), out)

    return jax.lax.cond(q_len == 1, lambda o: decode_query(s, 0, o), prefill, out)

  out = jax.lax.fori_loop(0, num_seqs_1[0], row, out0)
  return out[:t]
