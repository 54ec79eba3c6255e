"""Ring attention over the "sequence" mesh axis (call inside shard_map).

Each device keeps its query chunk while key/value chunks (with their segment ids)
travel round the axis by ppermute; chunk results merge by online softmax (logsumexp
weights) and chunks wholly in the future are skipped. The backward pass is a second
ring in which dk/dv travel with their chunk and arrive home after a full turn. Chunk
computations are `Blocks`: the XLA ones or the flash kernel's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels.flash_attention as flash
from llm.ops.attention.xla import Blocks

_EMPTY_LSE = flash.EMPTY_LSE  # a row that sees no key; the kernels' convention


def flash_blocks(opts: flash.Options) -> Blocks:
  """The Pallas kernel's chunk functions (causal, window and blocks fixed in opts)."""
  return Blocks(functools.partial(flash.block_fwd, opts=opts),
                functools.partial(flash.block_bwd, opts=opts))


def merge(o_BTHE, lse_BHT, o_step_BTHE, lse_step_BHT):
  """Online-softmax merge of two partial results over disjoint key sets."""
  lse_new = jnp.logaddexp(lse_BHT, lse_step_BHT)
  w_old = jnp.exp(lse_BHT - lse_new).transpose(0, 2, 1)[..., None]
  w_step = jnp.exp(lse_step_BHT - lse_new).transpose(0, 2, 1)[..., None]
  return o_BTHE * w_old + o_step_BTHE.astype(jnp.float32) * w_step, lse_new


def _filled(shape, value, dtype, *like):
  """A constant array typed to vary over the same manual mesh axes as `like` (both
  branches of a lax.cond under shard_map must agree)."""
  return flash.match_vma(jnp.full(shape, value, dtype), *like)[0]


def _ring_shift(xs, axis_name, n):
  return [lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)]) for x in xs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def ring_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, blocks: Blocks, axis_name: str):
  """Causal attention of this device's query chunk over the whole sequence, whose
  chunks are spread in order over `axis_name` (call inside shard_map)."""
  return _ring_fwd(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, blocks, axis_name)[0]


def _ring_fwd(q, k, v, seg, blocks: Blocks, axis_name):
  n = lax.axis_size(axis_name)
  me = lax.axis_index(axis_name)
  b, t, h, e = q.shape
  o = jnp.zeros((b, t, h, e), jnp.float32)
  lse = jnp.full((b, h, t), _EMPTY_LSE, jnp.float32)
  k_cur, v_cur, seg_cur = k, v, seg
  for step in range(n):
    src = (me - step) % n  # whose chunk this device holds now

    def compute(k_cur=k_cur, v_cur=v_cur, seg_cur=seg_cur, src=src):
      return blocks.fwd(q, k_cur, v_cur, seg, seg_cur, me * t, src * t)

    def skip(k_cur=k_cur, v_cur=v_cur, seg_cur=seg_cur):  # a chunk wholly in the future
      like = (q, k_cur, v_cur, seg, seg_cur, me)
      return (_filled(q.shape, 0, q.dtype, *like),
              _filled((b, h, t), _EMPTY_LSE, jnp.float32, *like))

    o_step, lse_step = compute() if step == 0 else lax.cond(src < me, compute, skip)
    o, lse = merge(o, lse, o_step, lse_step)
    if step < n - 1:
      k_cur, v_cur, seg_cur = _ring_shift([k_cur, v_cur, seg_cur], axis_name, n)
  out = o.astype(q.dtype)
  return out, (q, k, v, seg, out, lse)


def _ring_bwd(blocks: Blocks, axis_name, residuals, do):
  q, k, v, seg, out, lse = residuals
  n = lax.axis_size(axis_name)
  me = lax.axis_index(axis_name)
  t = q.shape[1]
  delta = flash.output_delta(out, do)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk_cur = jnp.zeros(k.shape, jnp.float32)
  dv_cur = jnp.zeros(v.shape, jnp.float32)
  k_cur, v_cur, seg_cur = k, v, seg
  for step in range(n):
    src = (me - step) % n

    def compute(k_cur=k_cur, v_cur=v_cur, seg_cur=seg_cur, src=src):
      return blocks.bwd(q, k_cur, v_cur, seg, seg_cur, me * t, src * t, lse, delta, do)

    def skip(k_cur=k_cur, v_cur=v_cur, seg_cur=seg_cur):
      like = (q, k_cur, v_cur, seg, seg_cur, me, lse, delta, do)
      return (_filled(q.shape, 0, q.dtype, *like), _filled(k.shape, 0, k.dtype, *like),
              _filled(v.shape, 0, v.dtype, *like))

    dq_s, dk_s, dv_s = compute() if step == 0 else lax.cond(src < me, compute, skip)
    dq += dq_s.astype(jnp.float32)
    dk_cur += dk_s.astype(jnp.float32)
    dv_cur += dv_s.astype(jnp.float32)
    # dk/dv travel with their chunk; after n shifts every chunk's gradient is home.
    moving = [dk_cur, dv_cur] + ([k_cur, v_cur, seg_cur] if step < n - 1 else [])
    moved = _ring_shift(moving, axis_name, n)
    dk_cur, dv_cur = moved[:2]
    if step < n - 1:
      k_cur, v_cur, seg_cur = moved[2:]
  return dq.astype(q.dtype), dk_cur.astype(k.dtype), dv_cur.astype(v.dtype), None


ring_attention.defvjp(_ring_fwd, _ring_bwd)
