"""Attention kernels placed on the mesh: the implementations `config.model.attention`
names, run per shard with shard_map, and ring attention when the sequence is sharded.

Model code calls `attend(...)` with [B, T, H, E] activations and knows nothing of the
mesh. Here the current mesh (from `jax.set_mesh`, see `sharding.activation_sharding`)
and the logical-axis RULES decide how q/k/v are split:
  - "xla" with no sequence sharding: plain XLA attention, partitioned by GSPMD.
  - "flash": the Pallas kernel inside shard_map over batch and heads (a custom call
    cannot be partitioned by GSPMD).
  - mesh.sequence > 1: ring attention. Each device keeps its query chunk while key/
    value chunks (with their segment ids) travel round the "sequence" axis by
    ppermute; chunk results merge by online softmax (logsumexp weights). The backward
    pass is a second ring in which dk/dv travel with their chunk and arrive home after
    a full turn. Chunk computations are the "xla" block functions below or the flash
    kernel's block_fwd/block_bwd.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels.flash_attention as flash
from llm import sharding

IMPLEMENTATIONS = ("xla", "flash")
SEQUENCE_AXIS = "sequence"
_EMPTY_LSE = flash.EMPTY_LSE  # a row that sees no key; the kernels' convention


class Blocks(NamedTuple):
  """One (query chunk, key chunk) step: forward -> (out, lse); backward -> (dq, dk, dv)."""
  fwd: Callable
  bwd: Callable


# ------------------------------------------------------------------ XLA chunk functions

def _chunk_mask(qseg_BT, kvseg_BS, q_offset, kv_offset, window):
  t, s = qseg_BT.shape[1], kvseg_BS.shape[1]
  q_pos = q_offset + jnp.arange(t)[:, None]
  kv_pos = kv_offset + jnp.arange(s)[None, :]
  visible_TS = kv_pos <= q_pos
  if window is not None:
    visible_TS &= q_pos - kv_pos < window
  return (qseg_BT[:, :, None] == kvseg_BS[:, None, :]) & visible_TS[None]  # [B, T, S]


def _grouped_logits(q_BTHE, k_BSKE, scale):
  b, t, h, e = q_BTHE.shape
  kh = k_BSKE.shape[2]
  q_BTKGE = q_BTHE.reshape(b, t, kh, h // kh, e)
  return jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE,
                    preferred_element_type=jnp.float32) * scale


def xla_blocks(window: int | None) -> Blocks:
  """Chunk functions in plain XLA, causal with segment ids and an optional window;
  GQA without repeating K/V."""

  def fwd(q_BTHE, k_BSKE, v_BSKE, qseg_BT, kvseg_BS, q_offset, kv_offset):
    b, t, h, e = q_BTHE.shape
    mask_B11TS = _chunk_mask(qseg_BT, kvseg_BS, q_offset, kv_offset, window)[:, None, None]
    s_BKGTS = jnp.where(mask_B11TS, _grouped_logits(q_BTHE, k_BSKE, e ** -0.5), _EMPTY_LSE)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - m_BKGT[..., None]), 0.0)
    l_BKGT = jnp.sum(p_BKGTS, axis=-1)
    safe_l = jnp.where(l_BKGT == 0, 1.0, l_BKGT)
    o_BTKGE = jnp.einsum("bkgts,bske->btkge", p_BKGTS.astype(v_BSKE.dtype), v_BSKE,
                         preferred_element_type=jnp.float32)
    o_BTKGE = o_BTKGE / safe_l.transpose(0, 3, 1, 2)[..., None]
    lse_BKGT = jnp.where(l_BKGT == 0, _EMPTY_LSE, m_BKGT + jnp.log(safe_l))
    return (o_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype),
            lse_BKGT.reshape(b, h, t))

  def bwd(q_BTHE, k_BSKE, v_BSKE, qseg_BT, kvseg_BS, q_offset, kv_offset, lse_BHT, delta_BHT,
          do_BTHE):
    b, t, h, e = q_BTHE.shape
    kh = k_BSKE.shape[2]
    g = h // kh
    scale = e ** -0.5
    mask_B11TS = _chunk_mask(qseg_BT, kvseg_BS, q_offset, kv_offset, window)[:, None, None]
    s_BKGTS = _grouped_logits(q_BTHE, k_BSKE, scale)
    p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - lse_BHT.reshape(b, kh, g, t)[..., None]),
                        0.0)
    do_BTKGE = do_BTHE.reshape(b, t, kh, g, e)
    dv_BSKE = jnp.einsum("bkgts,btkge->bske", p_BKGTS.astype(do_BTHE.dtype), do_BTKGE,
                         preferred_element_type=jnp.float32)
    dp_BKGTS = jnp.einsum("btkge,bske->bkgts", do_BTKGE, v_BSKE,
                          preferred_element_type=jnp.float32)
    ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BHT.reshape(b, kh, g, t)[..., None]) * scale
    dq_BTKGE = jnp.einsum("bkgts,bske->btkge", ds_BKGTS.astype(k_BSKE.dtype), k_BSKE,
                          preferred_element_type=jnp.float32)
    dk_BSKE = jnp.einsum("bkgts,btkge->bske", ds_BKGTS.astype(q_BTHE.dtype),
                         q_BTHE.reshape(b, t, kh, g, e), preferred_element_type=jnp.float32)
    return (dq_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype), dk_BSKE.astype(k_BSKE.dtype),
            dv_BSKE.astype(v_BSKE.dtype))

  return Blocks(fwd, bwd)


def flash_blocks(opts: flash.Options) -> Blocks:
  """The Pallas kernel's chunk functions (causal, window and blocks fixed in opts)."""
  return Blocks(functools.partial(flash.block_fwd, opts=opts),
                functools.partial(flash.block_bwd, opts=opts))


# ----------------------------------------------------------------------- ring attention

def _merge(o_BTHE, lse_BHT, o_step_BTHE, lse_step_BHT):
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
    o, lse = _merge(o, lse, o_step, lse_step)
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


# -------------------------------------------------------------------------- dispatch

def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def attend(impl: str, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, *, window: int | None = None,
           block_q: int | None = None, block_k: int | None = None):
  """Causal attention within segments by the named implementation, on the current mesh."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}; allowed: {IMPLEMENTATIONS}")
  mesh = _current_mesh()
  b, t, h, e = q_BTHE.shape
  q_spec = None if mesh is None else sharding.logical_to_spec(
      ("batch", "length", "act_heads", "head_dim"), q_BTHE.shape, mesh)
  ring = q_spec is not None and q_spec[1] is not None
  if impl == "xla" and not ring:  # GSPMD partitions plain XLA attention by itself
    return xla_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, window)

  local_len = t // mesh.shape[SEQUENCE_AXIS] if ring else t
  if impl == "flash":
    opts = flash.make_options(local_len, local_len, e, causal=True, window=window,
                              block_q=block_q, block_k=block_k)
    blocks = flash_blocks(opts)
  else:
    blocks = xla_blocks(window)

  def local(q, k, v, seg):
    if ring:
      return ring_attention(q, k, v, seg, blocks, SEQUENCE_AXIS)
    return flash.flash_attention(q, k, v, seg, causal=True, window=window, block_q=opts.block_q,
                                 block_k=opts.block_k, backend=opts.backend,
                                 interpret=opts.interpret)

  if mesh is None:
    return local(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
  k_spec = sharding.logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"),
                                    k_BSKE.shape, mesh)
  if q_spec[2] != k_spec[2]:  # K/V heads don't split like query heads: give each its own
    k_BSKE, v_BSKE = (jnp.repeat(x, h // k_BSKE.shape[2], axis=2) for x in (k_BSKE, v_BSKE))
    k_spec = q_spec
  seg_spec = jax.sharding.PartitionSpec(*q_spec[:2])
  # Pallas' interpreter (CPU runs) does not track varying mesh axes, so the kernel path
  # turns the check off; "xla" keeps it.
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec),
                       out_specs=q_spec, check_vma=impl != "flash")(
                           q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)


def xla_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, window: int | None = None):
  """Reference attention: softmax in fp32, causal within each segment, optional window."""
  out, _ = xla_blocks(window).fwd(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, segment_ids_BT, 0, 0)
  return out
