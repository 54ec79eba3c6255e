"""Flash attention for TPU (Pallas Mosaic): blocked grids, VMEM scratch accumulators.

Layouts (the wrapper in __init__ pads and transposes): q/o/do [B, H, T, E],
k/v [B, K, S, E] with H = K * G (GQA: query head h reads key/value head h // G, never
a repeated copy), q segment ids [B, T, 1], key segment ids [B, 1, S], logsumexp and
delta [B, H, T, 1] float32, offsets int32[2] = (q_offset, kv_offset) in SMEM (scalar
prefetch), so the same compiled kernel serves any position offset (ring attention).

Tiles that the causal mask or the window hide entirely are skipped: no compute
(`pl.when`), and their index map repeats the previous block so no DMA is issued.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.common import (EMPTY_LSE, MASK_VALUE, Options, block_visible,
                                                   kv_block_range, out_struct, q_block_range,
                                                   dscores, scores, tile_mask)

NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def _when_visible(q_start, kv_start, opts: Options):
  visible = block_visible(q_start, kv_start, opts.block_q, opts.block_k, opts)
  if visible is None:
    return lambda f: f()
  return pl.when(visible)


def _kv_block(i, j, offs, n_kv_blocks, opts: Options):
  """Key block to fetch at grid point (i, j): j clamped into the visible range, so a
  hidden tile re-uses the block already in VMEM instead of issuing a DMA."""
  first, last = kv_block_range(offs[0] + i * opts.block_q, offs[1], n_kv_blocks, opts)
  return jnp.clip(j, first, last)


def _q_block(i, j, offs, n_q_blocks, opts: Options):
  """Query block to fetch for key block j at step i (dk/dv pass), clamped likewise."""
  first, last = q_block_range(offs[1] + j * opts.block_k, offs[0], n_q_blocks, opts)
  return jnp.clip(i, first, last)


def _compiler_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(opts: Options):
  return pltpu.InterpretParams() if opts.interpret else False


# ---------------------------------------------------------------------------- forward

def _fwd_kernel(offs_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, opts: Options):
  i, j = pl.program_id(2), pl.program_id(3)
  q_start = offs_ref[0] + i * opts.block_q
  kv_start = offs_ref[1] + j * opts.block_k

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @_when_visible(q_start, kv_start, opts)
  def _compute():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = scores(lax.dot_general(q, k, NT, preferred_element_type=jnp.float32), opts)
    mask = tile_mask(qseg_ref[...], kvseg_ref[...], q_start, kv_start, s.shape, opts)
    s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v,
                                                preferred_element_type=jnp.float32)
    m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_sc[...] / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, EMPTY_LSE, m_sc[...] + jnp.log(safe_l))


def _query_major_specs(group: int, n_kv_blocks: int, head_dim: int, opts: Options):
  """Block specs of a (B, H, query block i, key block j) grid, forward and dq:
  (query-row block, row-statistic block, key/value block, q segment, kv segment)."""
  bq, bk = opts.block_q, opts.block_k

  def q_map(b_, h_, i, j, offs):
    return b_, h_, i, 0

  def kv_map(b_, h_, i, j, offs):
    return b_, h_ // group, _kv_block(i, j, offs, n_kv_blocks, opts), 0

  def qseg_map(b_, h_, i, j, offs):
    return b_, i, 0

  def kvseg_map(b_, h_, i, j, offs):
    return b_, 0, _kv_block(i, j, offs, n_kv_blocks, opts)

  return (pl.BlockSpec((None, None, bq, head_dim), q_map),
          pl.BlockSpec((None, None, bq, 1), q_map),
          pl.BlockSpec((None, None, bk, head_dim), kv_map),
          pl.BlockSpec((None, bq, 1), qseg_map), pl.BlockSpec((None, 1, bk), kvseg_map))


def fwd(q, k, v, qseg, kvseg, offsets, opts: Options):
  """Returns (o [B, H, T, E], lse [B, H, T, 1] float32)."""
  b, h, t, e = q.shape
  n_kv_heads, s = k.shape[1], k.shape[2]
  nq, nk = t // opts.block_q, s // opts.block_k
  bq = opts.block_q
  q_spec, row_spec, kv_spec, qseg_spec, kvseg_spec = _query_major_specs(h // n_kv_heads, nk, e,
                                                                        opts)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kvseg_spec],
      out_specs=[q_spec, row_spec],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, e), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, opts=opts),
      grid_spec=grid_spec,
      out_shape=[out_struct(q.shape, q.dtype, q),
                 out_struct((b, h, t, 1), jnp.float32, q)],
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(opts),
      name="flash_attention_fwd",
  )(offsets, q, k, v, qseg, kvseg)


# --------------------------------------------------------------------------- backward

def _probs_and_dscores(q, k, v, do, lse, delta, mask, opts: Options):
  """Recomputed probabilities p and score gradients ds = p * (dp - delta) of one tile."""
  s = scores(lax.dot_general(q, k, NT, preferred_element_type=jnp.float32), opts)
  p = jnp.where(mask, jnp.exp(s - lse), 0.0)
  dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
  return p, dscores(p * (dp - delta), s, opts)


def _dq_kernel(offs_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
               dq_ref, dq_sc, *, opts: Options):
  i, j = pl.program_id(2), pl.program_id(3)
  q_start = offs_ref[0] + i * opts.block_q
  kv_start = offs_ref[1] + j * opts.block_k

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @_when_visible(q_start, kv_start, opts)
  def _compute():
    q, k = q_ref[...], k_ref[...]
    mask = tile_mask(qseg_ref[...], kvseg_ref[...], q_start, kv_start,
                     (opts.block_q, opts.block_k), opts)
    _, ds = _probs_and_dscores(q, k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                               mask, opts)
    dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * opts.scale).astype(dq_ref.dtype)


def _dkv_kernel(offs_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, opts: Options, n_q_blocks: int):
  j, r = pl.program_id(2), pl.program_id(3)  # r runs over (query head in group, query block)
  i = r % n_q_blocks
  q_start = offs_ref[0] + i * opts.block_q
  kv_start = offs_ref[1] + j * opts.block_k

  @pl.when(r == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @_when_visible(q_start, kv_start, opts)
  def _compute():
    q, do = q_ref[...], do_ref[...]
    mask = tile_mask(qseg_ref[...], kvseg_ref[...], q_start, kv_start,
                     (opts.block_q, opts.block_k), opts)
    p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                               mask, opts)
    dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(r == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * opts.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def bwd(q, k, v, qseg, kvseg, offsets, lse, delta, do, opts: Options):
  """Returns (dq, dk, dv) in the layouts and dtypes of q, k, v."""
  b, h, t, e = q.shape
  n_kv_heads, s = k.shape[1], k.shape[2]
  g = h // n_kv_heads
  nq, nk = t // opts.block_q, s // opts.block_k
  bq, bk = opts.block_q, opts.block_k
  sem = ("parallel", "parallel", "parallel", "arbitrary")

  # dq: grid over query blocks, reducing over key blocks.
  q_spec, row_spec, kv_spec, qseg_spec, kvseg_spec = _query_major_specs(g, nk, e, opts)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, opts=opts),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kvseg_spec, row_spec, row_spec, q_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, e), jnp.float32)]),
      out_shape=out_struct(q.shape, q.dtype, q),
      compiler_params=_compiler_params(sem),
      interpret=_interpret(opts),
      name="flash_attention_dq",
  )(offsets, q, k, v, qseg, kvseg, lse, delta, do)

  # dk, dv: grid over key blocks of each key/value head, reducing over the G query heads
  # that share it and over their query blocks.
  def qh_map(b_, kh, j, r, offs):
    return b_, kh * g + r // nq, _q_block(r % nq, j, offs, nq, opts), 0

  def k_map(b_, kh, j, r, offs):
    return b_, kh, j, 0

  def qseg2_map(b_, kh, j, r, offs):
    return b_, _q_block(r % nq, j, offs, nq, opts), 0

  def kvseg2_map(b_, kh, j, r, offs):
    return b_, 0, j

  qh_spec = pl.BlockSpec((None, None, bq, e), qh_map)
  k_spec = pl.BlockSpec((None, None, bk, e), k_map)
  row2_spec = pl.BlockSpec((None, None, bq, 1), qh_map)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, opts=opts, n_q_blocks=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, n_kv_heads, nk, g * nq),
          in_specs=[qh_spec, k_spec, k_spec,
                    pl.BlockSpec((None, bq, 1), qseg2_map), pl.BlockSpec((None, 1, bk), kvseg2_map),
                    row2_spec, row2_spec, qh_spec],
          out_specs=[k_spec, k_spec],
          scratch_shapes=[pltpu.VMEM((bk, e), jnp.float32), pltpu.VMEM((bk, e), jnp.float32)]),
      out_shape=[out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
      compiler_params=_compiler_params(sem),
      interpret=_interpret(opts),
      name="flash_attention_dkv",
  )(offsets, q, k, v, qseg, kvseg, lse, delta, do)
  return dq, dk, dv
