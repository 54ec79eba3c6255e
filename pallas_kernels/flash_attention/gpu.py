"""Flash attention for GPU (Pallas Triton).

Layouts are the model's own (the wrapper in __init__ only pads): q/o/do [B, T, H, E],
k/v [B, S, K, E] with H = K * G, segment ids [B, T] and [B, S], logsumexp and delta
[B, H, T] float32, offsets int32[2] = (q_offset, kv_offset). One program owns a query
block (forward, dq) or a key block of one key/value head (dk, dv) and loops over the
other side's blocks, visiting only the range the causal mask / window leaves visible.
GQA: a dk/dv program reads the G query heads of its group; K/V are never repeated.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.common import (EMPTY_LSE, MASK_VALUE, Options, dscores,
                                                   kv_block_range, out_struct, q_block_range,
                                                   scores, tile_mask)

NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _params(e: int, opts: Options):
  # Defaults from `benchmarks/attention.py --sweep 4096` on an H100 (BENCHMARKS.md): with
  # 64 x 64 blocks, 4 warps ran forward + backward 1.9x faster than 8 at head dim 128.
  return plgpu.CompilerParams(num_warps=opts.num_warps or (4 if e <= 128 else 8),
                              num_stages=opts.num_stages or 2)


def _tile(q, k, qseg, kvseg, q_start, kv_start, opts: Options):
  s = scores(lax.dot_general(q, k, NT, preferred_element_type=jnp.float32), opts)
  mask = tile_mask(qseg[:, None], kvseg[None, :], q_start, kv_start, s.shape, opts)
  return s, mask


# ---------------------------------------------------------------------------- forward

def _fwd_kernel(offs_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *,
                opts: Options, n_kv_blocks: int):
  bq, bk = opts.block_q, opts.block_k
  q_offset, kv_offset = offs_ref[0], offs_ref[1]
  q_start = q_offset + pl.program_id(2) * bq
  q, qseg = q_ref[...], qseg_ref[...]
  first, last = kv_block_range(q_start, kv_offset, n_kv_blocks, opts)

  def body(j, carry):
    acc, m, l = carry
    rows = pl.ds(j * bk, bk)
    v = v_ref[rows, :]
    s, mask = _tile(q, k_ref[rows, :], qseg, kvseg_ref[rows], q_start, kv_offset + j * bk, opts)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(first, last + 1, body, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, EMPTY_LSE, m + jnp.log(safe_l))


def _offsets_spec():
  return pl.BlockSpec((2,), lambda *idx: (0,))


def fwd(q, k, v, qseg, kvseg, offsets, opts: Options):
  """Returns (o [B, T, H, E], lse [B, H, T] float32)."""
  b, t, h, e = q.shape
  s, n_kv_heads = k.shape[1], k.shape[2]
  g = h // n_kv_heads
  bq = opts.block_q
  return pl.pallas_call(
      functools.partial(_fwd_kernel, opts=opts, n_kv_blocks=s // opts.block_k),
      grid=(b, h, t // bq),
      in_specs=[_offsets_spec(),
                pl.BlockSpec((None, bq, None, e), lambda b_, h_, i: (b_, i, h_, 0)),
                pl.BlockSpec((None, s, None, e), lambda b_, h_, i: (b_, 0, h_ // g, 0)),
                pl.BlockSpec((None, s, None, e), lambda b_, h_, i: (b_, 0, h_ // g, 0)),
                pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))],
      out_specs=[pl.BlockSpec((None, bq, None, e), lambda b_, h_, i: (b_, i, h_, 0)),
                 pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))],
      out_shape=[out_struct(q.shape, q.dtype, q),
                 out_struct((b, h, t), jnp.float32, q)],
      compiler_params=_params(e, opts),
      interpret=opts.interpret,
      name="flash_attention_fwd",
  )(offsets, q, k, v, qseg, kvseg)


# --------------------------------------------------------------------------- backward

def _dq_kernel(offs_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
               dq_ref, *, opts: Options, n_kv_blocks: int):
  bk = opts.block_k
  q_offset, kv_offset = offs_ref[0], offs_ref[1]
  q_start = q_offset + pl.program_id(2) * opts.block_q
  q, qseg, do = q_ref[...], qseg_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  first, last = kv_block_range(q_start, kv_offset, n_kv_blocks, opts)

  def body(j, dq):
    rows = pl.ds(j * bk, bk)
    k = k_ref[rows, :]
    s, mask = _tile(q, k, qseg, kvseg_ref[rows], q_start, kv_offset + j * bk, opts)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = lax.dot_general(do, v_ref[rows, :], NT, preferred_element_type=jnp.float32)
    ds = dscores(p * (dp - delta[:, None]), s, opts)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(first, last + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * opts.scale).astype(dq_ref.dtype)


def _dkv_kernel(offs_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
                dk_ref, dv_ref, *, opts: Options, n_q_blocks: int, group: int):
  bq = opts.block_q
  q_offset, kv_offset = offs_ref[0], offs_ref[1]
  kv_start = kv_offset + pl.program_id(2) * opts.block_k
  k, v, kvseg = k_ref[...], v_ref[...], kvseg_ref[...]
  first, last = q_block_range(kv_start, q_offset, n_q_blocks, opts)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(group):  # the query heads sharing this key/value head
    def body(i, carry, g=g):
      dk, dv = carry
      rows = pl.ds(i * bq, bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      s, mask = _tile(q, k, qseg_ref[rows], kvseg, q_offset + i * bq, kv_start, opts)
      p = jnp.where(mask, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)
      dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
      ds = dscores(p * (dp - delta_ref[g, rows][:, None]), s, opts)
      dv = dv + lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
      dk = dk + lax.dot_general(ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32)
      return dk, dv
    dk, dv = lax.fori_loop(first, last + 1, body, (dk, dv))
  dk_ref[...] = (dk * opts.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def bwd(q, k, v, qseg, kvseg, offsets, lse, delta, do, opts: Options):
  """Returns (dq, dk, dv) in the layouts and dtypes of q, k, v."""
  b, t, h, e = q.shape
  s, n_kv_heads = k.shape[1], k.shape[2]
  g = h // n_kv_heads
  bq, bk = opts.block_q, opts.block_k
  q_block = pl.BlockSpec((None, bq, None, e), lambda b_, h_, i: (b_, i, h_, 0))
  kv_full = pl.BlockSpec((None, s, None, e), lambda b_, h_, i: (b_, 0, h_ // g, 0))
  row_block = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, opts=opts, n_kv_blocks=s // bk),
      grid=(b, h, t // bq),
      in_specs=[_offsets_spec(), q_block, kv_full, kv_full,
                pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0)),
                row_block, row_block, q_block],
      out_specs=q_block,
      out_shape=out_struct(q.shape, q.dtype, q),
      compiler_params=_params(e, opts),
      interpret=opts.interpret,
      name="flash_attention_dq",
  )(offsets, q, k, v, qseg, kvseg, lse, delta, do)

  q_group = pl.BlockSpec((None, t, g, e), lambda b_, kh, j: (b_, 0, kh, 0))
  kv_block = pl.BlockSpec((None, bk, None, e), lambda b_, kh, j: (b_, j, kh, 0))
  rows_group = pl.BlockSpec((None, g, t), lambda b_, kh, j: (b_, kh, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, opts=opts, n_q_blocks=t // bq, group=g),
      grid=(b, n_kv_heads, s // bk),
      in_specs=[_offsets_spec(), q_group, kv_block, kv_block,
                pl.BlockSpec((None, t), lambda b_, kh, j: (b_, 0)),
                pl.BlockSpec((None, bk), lambda b_, kh, j: (b_, j)),
                rows_group, rows_group, q_group],
      out_specs=[kv_block, kv_block],
      out_shape=[out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
      compiler_params=_params(e, opts),
      interpret=opts.interpret,
      name="flash_attention_dkv",
  )(offsets, q, k, v, qseg, kvseg, lse, delta, do)
  return dq, dk, dv
