"""What the TPU and GPU flash-attention kernels share: options, masks, block visibility.

Masking convention (both kernels and the reference): query row t at position
`q_offset + t` sees key column s at position `kv_offset + s` iff their segment ids
are equal and, when causal, kv_pos <= q_pos, and, with a window W, q_pos - kv_pos < W
(|q_pos - kv_pos| < W when not causal). A row that sees nothing gets output 0 and
logsumexp EMPTY_LSE, so partial results combine correctly (ring attention).

Logits are q.k x scale, soft-capped when `softcap` is set (Gemma 2): cap x tanh(s / cap);
the backward passes multiply the score gradients by the cap's derivative 1 - tanh^2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

MASK_VALUE = -1e30  # finite: exp(MASK_VALUE - m) underflows to 0 without inf - inf = nan
EMPTY_LSE = MASK_VALUE
PAD_Q_SEGMENT = -1  # padded query rows and key columns never match each other or real ids
PAD_KV_SEGMENT = -2


@dataclasses.dataclass(frozen=True)
class Options:
  """Static kernel options (hashable: a custom_vjp nondiff argument)."""
  causal: bool
  window: int | None
  scale: float
  block_q: int
  block_k: int
  backend: str  # "tpu" (Mosaic) or "gpu" (Triton)
  interpret: bool
  num_warps: int | None = None  # Triton launch options (GPU); None: chosen by head dim
  num_stages: int | None = None
  softcap: float | None = None  # logits cap x tanh(s / cap)


def scores(s, opts: Options):
  """A tile's scaled logits q.k x scale, soft-capped per opts.softcap."""
  s = s * opts.scale
  return s if opts.softcap is None else opts.softcap * jnp.tanh(s / opts.softcap)


def dscores(ds, s, opts: Options):
  """Score gradients w.r.t. the uncapped logits, from those w.r.t. `scores`' output s."""
  return ds if opts.softcap is None else ds * (1.0 - jnp.square(s / opts.softcap))


def block_visible(q_start, kv_start, block_q: int, block_k: int, opts: Options):
  """Whether any (query, key) pair of a block_q x block_k tile is visible by position.

  Returns None when every tile is (no causal mask, no window)."""
  conds = []
  if opts.causal:
    conds.append(kv_start <= q_start + block_q - 1)
  if opts.window is not None:
    conds.append(q_start - (kv_start + block_k - 1) < opts.window)
    if not opts.causal:
      conds.append(kv_start - (q_start + block_q - 1) < opts.window)
  if not conds:
    return None
  out = conds[0]
  for c in conds[1:]:
    out = jnp.logical_and(out, c)
  return out


def attention_mask(q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, window: int | None):
  """THE masking rule (kernels, reference, XLA and ring chunks, cached decoding): which
  (query, key) pairs are visible. Arguments broadcast against each other (positions
  and segment ids of queries along one axis, of keys along the other)."""
  mask = q_seg == kv_seg
  if causal:
    mask = jnp.logical_and(mask, kv_pos <= q_pos)
  if window is not None:
    mask = jnp.logical_and(mask, q_pos - kv_pos < window)
    if not causal:
      mask = jnp.logical_and(mask, kv_pos - q_pos < window)
  return mask


def tile_mask(q_seg, kv_seg, q_start, kv_start, shape, opts: Options):
  """[block_q, block_k] visibility of one tile; q_seg broadcasts over columns, kv_seg
  over rows."""
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  return attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal=opts.causal, window=opts.window)


def _floor_div_clipped(x, block: int, n_blocks: int):
  return jnp.clip(lax.div(jnp.maximum(x, 0), block), 0, n_blocks - 1)


def kv_block_range(q_start, kv_offset, n_kv_blocks: int, opts: Options):
  """[first, last] key blocks holding a position visible to the query block at q_start.

  Clamped into [0, n_kv_blocks - 1]; a block outside it is invisible by position."""
  q_end = q_start + opts.block_q - 1
  first, last = 0, n_kv_blocks - 1
  if opts.window is not None:
    first = _floor_div_clipped(q_start - opts.window + 1 - kv_offset, opts.block_k, n_kv_blocks)
  if opts.causal:
    last = _floor_div_clipped(q_end - kv_offset, opts.block_k, n_kv_blocks)
  elif opts.window is not None:
    last = _floor_div_clipped(q_end + opts.window - 1 - kv_offset, opts.block_k, n_kv_blocks)
  return first, last


def q_block_range(kv_start, q_offset, n_q_blocks: int, opts: Options):
  """[first, last] query blocks with a position that sees the key block at kv_start."""
  kv_end = kv_start + opts.block_k - 1
  first, last = 0, n_q_blocks - 1
  if opts.causal:
    first = _floor_div_clipped(kv_start - q_offset, opts.block_q, n_q_blocks)
  elif opts.window is not None:
    first = _floor_div_clipped(kv_start - opts.window + 1 - q_offset, opts.block_q, n_q_blocks)
  if opts.window is not None:
    last = _floor_div_clipped(kv_end + opts.window - 1 - q_offset, opts.block_q, n_q_blocks)
  return first, last


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """Kernel output type varying over the same manual mesh axes as `like` (inside
  shard_map the inputs are first made to agree, see `match_vma`)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


def match_vma(*xs):
  """Casts every array to vary over the union of the manual axes any of them varies
  over, so one kernel output type fits them all under shard_map."""
  union = frozenset().union(*(jax.typeof(x).mat.varying for x in xs))
  out = []
  for x in xs:
    missing = tuple(sorted(union - jax.typeof(x).mat.varying))
    out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
  return out
