"""Pipeline parallelism over the "pipeline" mesh axis: a circular (looped) schedule.

The scanned layer stack (L layers, stored in layer order, its leading axis sharded over
"pipeline" by the rules table's "layers" row) is cut into P stages x R repeats of
k = L / (P R) layers: chunk c = r P + s (layers c k .. c k + k - 1) runs on stage s in
repeat r, so with R > 1 a microbatch goes round the ring of stages R times (MaxText's
circular schedule; R = 1 is GPipe). The batch is cut into M microbatches (rows m, m + M,
..., so each stays split over the data axes). At iteration t stage s works on item
i = t - s (microbatch i mod M, repeat i div M); after each iteration every stage hands
its output to the next with one `ppermute`, and stage 0 keeps the items coming back
from stage P-1 until their next repeat (M >= P when R > 1). M R + P - 1 iterations run;
stages idle in P - 1 of them: the bubble, (P - 1) / (R M + P - 1) of the time.

The loop runs inside `shard_map` over "pipeline" alone: data, FSDP and tensor
parallelism inside a stage stay GSPMD's, as without a pipeline. FSDP weights are
gathered per iteration (each stage gathers the chunk it runs, every time it runs it).
The stage outputs of the last repeat are summed over "pipeline" at the end, so the
final norm, the head and the loss run on every stage (replicated, as the embedding).

What the layers sow (MoE's auxiliary losses, metrics and balancing-bias corrections) is
collected per layer, summed over the microbatches (the bubble's iterations masked out),
and returned in layer order: each layer's value per microbatch, as `train.grad_accum`
over the same rows (microbatch m = rows m, m + M, ...) gives it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm.config import scan_unit

PIPELINE_AXIS = "pipeline"


def stages(mesh) -> int:
  """The mesh's pipeline size (1: no pipeline, or no mesh)."""
  if mesh is None or mesh.empty or PIPELINE_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[PIPELINE_AXIS]


def bubble_fraction(n_stages: int, repeats: int, microbatches: int) -> float:
  """The share of stage-iterations spent idle: (P - 1) / (R M + P - 1)."""
  return (n_stages - 1) / (repeats * microbatches + n_stages - 1)


def microbatch_count(setting: int, n_stages: int) -> int:
  """train.pipeline_microbatches as the schedule runs it: 0 means one per stage."""
  return setting or n_stages


def splits(model_cfg, n_stages: int) -> bool:
  """Whether a model's scanned stack cuts into n_stages x model.pipeline_repeats chunks of
  whole scanned units (config.scan_unit), as the schedule needs."""
  layers, unit = scan_unit(model_cfg)
  return bool(model_cfg.scan_layers) and layers % (unit * n_stages *
                                                   model_cfg.pipeline_repeats) == 0


def _swap_chunk_axes(tree, outer: int, inner: int):
  """[outer x inner x k, ...] stacks with the outer and inner chunk axes swapped."""
  def swap(a):
    k = a.shape[0] // (outer * inner)
    return a.reshape(outer, inner, k, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

  return jax.tree.map(swap, tree)


def circular_order(layer_params, n_stages: int, repeats: int):
  """Layer-ordered stacks [L, ...] ([R, P, k] flattened) reordered stage-major ([P, R, k]),
  so that a contiguous split over the pipeline gives stage s its chunks s, P + s, ..."""
  return layer_params if repeats == 1 else _swap_chunk_axes(layer_params, repeats, n_stages)


def layer_order(stage_major, n_stages: int, repeats: int):
  """The inverse of `circular_order`: stage-major stacks back in layer order."""
  return stage_major if repeats == 1 else _swap_chunk_axes(stage_major, n_stages, repeats)


def run(stage_fn: Callable, layer_params, x_BTD, segment_ids_BT, positions_BT, *, mesh,
        repeats: int, microbatches: int, rng=None):
  """(x after all L layers of `layer_params` ([L, ...] stacks, layer order), what they
  sowed), pipelined over the mesh's "pipeline" axis. stage_fn(params [k, ...], x,
  segment_ids, positions, rng) -> (y, sown) applies k consecutive layers to one
  microbatch; `sown` is a tree of [k, ...] arrays (possibly empty). The returned tree
  holds them as [L, ...] in layer order, summed over the microbatches."""
  n = stages(mesh)
  b = x_BTD.shape[0]
  m_count = microbatches
  if b % m_count:
    raise ValueError(f"{b} rows do not split into {m_count} pipeline microbatches")
  items = m_count * repeats
  params = circular_order(layer_params, n, repeats)

  def split(a):  # [B, ...] -> [M, B / M, ...]: microbatch m = rows m, m + M, ...
    return a.reshape(b // m_count, m_count, *a.shape[1:]).swapaxes(0, 1)

  def local(params_s, x, seg, pos, key):
    s = jax.lax.axis_index(PIPELINE_AXIS)
    params_s = jax.tree.map(lambda a: a.reshape(repeats, a.shape[0] // repeats, *a.shape[1:]),
                            params_s)
    x_m, seg_m, pos_m = split(x), split(seg), split(pos)
    loop_back = jnp.zeros_like(x_m) if repeats > 1 else None
    chunk0 = jax.tree.map(lambda a: a[0], params_s)
    _, sown_shapes = jax.eval_shape(stage_fn, chunk0, x_m[0], seg_m[0], pos_m[0], key)
    sown_sums = jax.tree.map(lambda a: jnp.zeros((repeats, *a.shape), a.dtype), sown_shapes)

    def body(carry, t):
      state, loop_back, sown_sums = carry
      i = jnp.clip(t - s, 0, items - 1)
      r, m = i // m_count, i % m_count
      if repeats > 1:  # stage 0 keeps what stage P-1 finished at t-1 for its next repeat
        back = t - n
        keep = (s == 0) & (back >= 0) & (back // m_count < repeats - 1)
        slot = jnp.clip(back, 0, items - 1) % m_count
        loop_back = jnp.where(keep, loop_back.at[slot].set(state), loop_back)
        first = jnp.where(r == 0, x_m[m], loop_back[m])
      else:
        first = x_m[m]
      h = jnp.where(s == 0, first, state)
      chunk = jax.tree.map(lambda a: a[r], params_s)
      step_key = None if key is None else jax.random.fold_in(key, t * n + s)
      y, sown = stage_fn(chunk, h, seg_m[m], pos_m[m], step_key)
      working = (t >= s) & (t - s < items)  # not in the bubble
      sown_sums = jax.tree.map(lambda total, v: total.at[r].add(jnp.where(working, v, 0)),
                               sown_sums, sown)
      state = jax.lax.ppermute(y, PIPELINE_AXIS, [(j, (j + 1) % n) for j in range(n)])
      return (state, loop_back, sown_sums), y

    steps = jnp.arange(items + n - 1)
    (_, _, sown_sums), ys = jax.lax.scan(
        jax.checkpoint(body), (jnp.zeros_like(x_m[0]), loop_back, sown_sums), steps)
    # stage P-1 finishes item i at iteration i + P - 1; the last repeat's are the output
    last = ys[n - 1 + (repeats - 1) * m_count:n - 1 + items]  # [M, B / M, ...]
    out = jax.lax.psum(jnp.where(s == n - 1, last, jnp.zeros_like(last)), PIPELINE_AXIS)
    # this stage's chunks r P + s, each [k, ...]: stage-major [R k, ...]
    sown_sums = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), sown_sums)
    return out.swapaxes(0, 1).reshape(x.shape), sown_sums

  param_specs = jax.tree.map(lambda _: P(PIPELINE_AXIS), params)
  key_arg = jnp.zeros((), jnp.uint32) if rng is None else rng
  out, sown = jax.shard_map(
      lambda p, x, seg, pos, k: local(p, x, seg, pos, None if rng is None else k),
      mesh=mesh, in_specs=(param_specs, P(), P(), P(), P()), out_specs=(P(), P(PIPELINE_AXIS)),
      axis_names={PIPELINE_AXIS}, check_vma=False)(params, x_BTD, segment_ids_BT, positions_BT,
                                                   key_arg)
  return out, layer_order(sown, n, repeats)
