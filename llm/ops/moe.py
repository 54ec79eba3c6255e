"""Routed experts: tokens to their chosen experts' SwiGLUs and back, weighted and summed.

`routed_experts(...)` picks the compute (`model.moe.compute`, COMPUTE) and, when the
ambient mesh has an "expert" axis, runs expert parallelism:
  - "dropless": the token-expert assignments sorted by expert and run as grouped matmuls
    (`jax.lax.ragged_dot`), every assignment computed;
  - "megablox": the same with the Pallas TPU grouped matmul (megablox gmm/tgmm); on a
    CPU it runs in Pallas' interpreter (for tests), on a GPU it is refused;
  - "capacity": einsum dispatch into [experts, capacity, D] buffers of
    capacity_factor x (tokens x k / experts) slots, served first-choice first in token
    order; assignments past an expert's capacity are dropped (the fraction is returned).
  - expert parallel, dropless (mesh.expert > 1): inside shard_map each device gathers the
    tokens of its expert group (all-gather over "expert"), runs the assignments to its own
    experts as grouped matmuls (the others give zero rows), and the partial sums go back
    to the tokens' owners by reduce-scatter. Every assignment is computed exactly once.
    (A ragged all-to-all would move only the routed rows, but XLA:CPU cannot run it, so
    it could not be tested here.)
  - expert parallel, capacity: each device dispatches its own tokens into [experts,
    capacity, D] buffers (capacity from its local token count), an all-to-all over
    "expert" sends each expert group's buffers to the device holding those experts, they
    run there, and a second all-to-all brings the outputs back (GShard).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm.parallel.rules import logical_to_spec

EXPERT_AXIS = "expert"


def _ragged_dot(x_MK, w_GKN, group_sizes_G):
  return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)


def _megablox(x_MK, w_GKN, group_sizes_G):
  """Pallas TPU grouped matmul; rows are padded to the row tile, rows past the groups are 0."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm

  from pallas_kernels.flash_attention import default_backend
  backend, interpret = default_backend()
  if backend != "tpu" and not interpret:
    raise ValueError("model.moe.compute='megablox' is a TPU kernel; on a GPU use 'dropless'")
  m, k = x_MK.shape
  n = w_GKN.shape[-1]
  tm = min(512, -(-m // 8) * 8)
  padded = -(-m // tm) * tm
  out = gmm(jnp.pad(x_MK, ((0, padded - m), (0, 0))), w_GKN, group_sizes_G.astype(jnp.int32),
            x_MK.dtype, (tm, min(1024, k), min(1024, n)), None, None, False, interpret)[:m]
  in_groups = jnp.arange(m) < jnp.sum(group_sizes_G)
  return jnp.where(in_groups[:, None], out, 0)


def _swiglu_experts(x_MD, gate_EDF, up_EDF, down_EFD, group_sizes_E, dtype, grouped=_ragged_dot):
  """Each row of x through its expert's SwiGLU; rows sorted by expert, group_sizes_E of each."""
  x_MD = x_MD.astype(dtype)
  gate_MF = grouped(x_MD, gate_EDF.astype(dtype), group_sizes_E)
  up_MF = grouped(x_MD, up_EDF.astype(dtype), group_sizes_E)
  return grouped(nn.silu(gate_MF) * up_MF, down_EFD.astype(dtype), group_sizes_E)


def dropless(x_ND, weights_NK, experts_NK, gate_EDF, up_EDF, down_EFD, dtype,
             grouped=_ragged_dot):
  """(out [N, D], dropped fraction 0) with every assignment computed by grouped matmuls."""
  n, k = experts_NK.shape
  e = gate_EDF.shape[0]
  flat_expert = experts_NK.reshape(-1)  # assignment a = token a // k, slot a % k
  order = jnp.argsort(flat_expert, stable=True)
  group_sizes_E = jnp.zeros((e,), jnp.int32).at[flat_expert].add(1)
  sorted_x = jnp.take(x_ND, order // k, axis=0)
  out_sorted = _swiglu_experts(sorted_x, gate_EDF, up_EDF, down_EFD, group_sizes_E, dtype,
                               grouped)
  out_AD = jnp.zeros_like(out_sorted).at[order].set(out_sorted)  # back to assignment order
  out_ND = jnp.sum(out_AD.reshape(n, k, -1) * weights_NK[..., None].astype(out_AD.dtype), axis=1)
  return out_ND, jnp.float32(0.0)


def _capacity_routing(weights_NK, experts_NK, n_experts: int, capacity_factor: float, dtype):
  """(dispatch [N, E, C] 0/1, combine [N, E, C] routing weights, dropped fraction) for
  [E, C] expert buffers filled in token order, first slot k=0 of every token first."""
  n, k = experts_NK.shape
  e = n_experts
  cap = max(1, math.ceil(capacity_factor * n * k / e))
  onehot_KNE = jax.nn.one_hot(experts_NK.T, e, dtype=jnp.int32)  # slot-major priority
  position_KNE = jnp.cumsum(onehot_KNE.reshape(k * n, e), axis=0).reshape(k, n, e) - 1
  kept_KNE = onehot_KNE * (position_KNE < cap)
  dispatch_NEC = jnp.einsum("kne,knec->nec", kept_KNE,
                            jax.nn.one_hot(position_KNE, cap, dtype=jnp.int32)).astype(dtype)
  combine_NEC = jnp.einsum("kne,kn,knec->nec", kept_KNE.astype(jnp.float32), weights_NK.T,
                           jax.nn.one_hot(position_KNE, cap, dtype=jnp.float32)).astype(dtype)
  dropped = 1.0 - jnp.sum(kept_KNE).astype(jnp.float32) / (n * k)
  return dispatch_NEC, combine_NEC, dropped


def _per_expert(x_ECI, w_EIO):
  """[E, C, I] x [E, I, O] -> [E, C, O], each expert's rows times its own weight. A plain
  `jax.lax.dot_general`, so that quantized training (train.quantization, qwix) can take
  these matmuls and leave the one-hot dispatch and combine einsums alone."""
  return jax.lax.dot_general(x_ECI, w_EIO, (((2,), (1,)), ((0,), (0,))))


def _swiglu_buffers(x_ECD, gate_EDF, up_EDF, down_EFD, dtype):
  """Each expert's SwiGLU over its buffer of rows."""
  x_ECD = x_ECD.astype(dtype)
  gate_ECF = _per_expert(x_ECD, gate_EDF.astype(dtype))
  up_ECF = _per_expert(x_ECD, up_EDF.astype(dtype))
  return _per_expert(nn.silu(gate_ECF) * up_ECF, down_EFD.astype(dtype))


def capacity(x_ND, weights_NK, experts_NK, gate_EDF, up_EDF, down_EFD, dtype,
             capacity_factor: float):
  """(out [N, D], dropped fraction) with fixed [E, C] expert buffers; assignments are
  served in token order (first slot k=0 of every token first), overflow dropped."""
  dispatch_NEC, combine_NEC, dropped = _capacity_routing(
      weights_NK, experts_NK, gate_EDF.shape[0], capacity_factor, dtype)
  x_ECD = jnp.einsum("nec,nd->ecd", dispatch_NEC, x_ND.astype(dtype))
  y_ECD = _swiglu_buffers(x_ECD, gate_EDF, up_EDF, down_EFD, dtype)
  return jnp.einsum("nec,ecd->nd", combine_NEC, y_ECD), dropped


def megablox(x_ND, weights_NK, experts_NK, gate_EDF, up_EDF, down_EFD, dtype):
  """`dropless` with the Pallas TPU grouped matmul."""
  return dropless(x_ND, weights_NK, experts_NK, gate_EDF, up_EDF, down_EFD, dtype, _megablox)


# config.model.moe.compute -> how routed tokens reach their experts
COMPUTE = {"dropless": dropless, "megablox": megablox, "capacity": capacity}
GROUPED_MATMULS = {"dropless": _ragged_dot, "megablox": _megablox}


def _expert_parallel(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD, dtype, mesh,
                     grouped):
  """Dropless routed experts with the experts split over the mesh's "expert" axis."""
  token_spec = logical_to_spec(("batch", "length", None), x_BTD.shape, mesh)
  expert_spec = P(EXPERT_AXIS, None, None)
  batch_axes = token_spec[0] if isinstance(token_spec[0], tuple) else (token_spec[0],)
  split = EXPERT_AXIS in batch_axes  # else (a batch too small to split) every device has all

  def local(x, w, ex, gate, up, down):
    b, t, d = x.shape
    k = ex.shape[-1]
    n_local = gate.shape[0]
    def gather(a):  # the expert group's tokens
      return jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True) if split else a

    x_all, w_all, ex_all = gather(x), gather(w), gather(ex)
    x_ND = x_all.reshape(-1, d)
    local_id = ex_all.reshape(-1) - jax.lax.axis_index(EXPERT_AXIS) * n_local
    mine = (local_id >= 0) & (local_id < n_local)
    order = jnp.argsort(jnp.where(mine, local_id, n_local), stable=True)  # others last
    group_sizes = jnp.zeros((n_local,), jnp.int32).at[jnp.where(mine, local_id, 0)].add(
        mine.astype(jnp.int32))
    y_sorted = _swiglu_experts(jnp.take(x_ND, order // k, axis=0), gate, up, down,
                               group_sizes, dtype, grouped)  # rows of others' experts: 0
    y_AD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    partial = jnp.sum(y_AD.reshape(-1, k, d) * w_all.reshape(-1, k, 1).astype(y_AD.dtype), axis=1)
    partial = partial.reshape(x_all.shape)
    if not split:
      return jax.lax.psum(partial, EXPERT_AXIS)
    return jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(token_spec, token_spec, token_spec, expert_spec, expert_spec,
                                 expert_spec),
                       out_specs=token_spec, check_vma=grouped is _ragged_dot)(
                           x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD)


def _expert_parallel_capacity(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD,
                              dtype, capacity_factor: float, mesh):
  """Capacity-buffer routed experts with the experts split over "expert": all-to-all out,
  local experts, all-to-all back. Returns (out, dropped fraction averaged over devices)."""
  token_spec = logical_to_spec(("batch", "length", None), x_BTD.shape, mesh)
  expert_spec = P(EXPERT_AXIS, None, None)
  token_axes = tuple(a for part in token_spec if part is not None
                     for a in (part if isinstance(part, tuple) else (part,)))
  e = gate_EDF.shape[0]
  ep = dict(mesh.shape)[EXPERT_AXIS]

  def local(x, w, ex, gate, up, down):
    b, t, d = x.shape
    k = ex.shape[-1]
    dispatch_NEC, combine_NEC, dropped = _capacity_routing(
        w.reshape(-1, k), ex.reshape(-1, k), e, capacity_factor, dtype)
    x_ECD = jnp.einsum("nec,nd->ecd", dispatch_NEC, x.reshape(-1, d).astype(dtype))
    c = x_ECD.shape[1]
    # [expert group g, local expert, C, D] -> device g gets [source device, local expert, ...]
    x_GLCD = jax.lax.all_to_all(x_ECD.reshape(ep, e // ep, c, d), EXPERT_AXIS, 0, 0)
    x_LSD = jnp.swapaxes(x_GLCD, 0, 1).reshape(e // ep, ep * c, d)
    y_LSD = _swiglu_buffers(x_LSD, gate, up, down, dtype)
    y_GLCD = jnp.swapaxes(y_LSD.reshape(e // ep, ep, c, d), 0, 1)
    y_ECD = jax.lax.all_to_all(y_GLCD, EXPERT_AXIS, 0, 0).reshape(e, c, d)
    out = jnp.einsum("nec,ecd->nd", combine_NEC, y_ECD).reshape(b, t, d)
    return out, jax.lax.pmean(dropped, token_axes) if token_axes else dropped

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(token_spec, token_spec, token_spec, expert_spec, expert_spec,
                                 expert_spec),
                       out_specs=(token_spec, P()), check_vma=False)(
                           x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD)


def routed_experts(compute: str, x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD,
                   dtype, capacity_factor: float):
  """(out [B, T, D], dropped fraction) by the named compute on the ambient mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  ep = 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)
  if ep > 1:
    if gate_EDF.shape[0] % ep:
      raise ValueError(f"model.moe.n_experts={gate_EDF.shape[0]} must be divisible by "
                       f"mesh.expert={ep}")
    if compute == "capacity":
      return _expert_parallel_capacity(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF,
                                       down_EFD, dtype, capacity_factor, mesh)
    return (_expert_parallel(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD,
                             dtype, mesh, GROUPED_MATMULS[compute]), jnp.float32(0.0))
  kwargs = {"capacity_factor": capacity_factor} if compute == "capacity" else {}

  def whole(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD):
    b, t, d = x_BTD.shape
    k = experts_BTK.shape[-1]
    out_ND, dropped = COMPUTE[compute](x_BTD.reshape(b * t, d), weights_BTK.reshape(b * t, k),
                                       experts_BTK.reshape(b * t, k), gate_EDF, up_EDF,
                                       down_EFD, dtype, **kwargs)
    return out_ND.reshape(b, t, d), dropped

  if compute != "megablox" or mesh.empty or mesh.size == 1:
    return whole(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD)
  # A Pallas kernel is not partitioned by GSPMD: each device runs it on its own tokens,
  # with every expert's weights gathered (in the compute dtype, as FSDP gathers them).
  token_spec = logical_to_spec(("batch", "length", None), x_BTD.shape, mesh)
  return jax.shard_map(whole, mesh=mesh, in_specs=(token_spec,) * 3 + (P(),) * 3,
                       out_specs=(token_spec, P()), check_vma=False)(
                           x_BTD, weights_BTK, experts_BTK, *(w.astype(dtype) for w in
                                                              (gate_EDF, up_EDF, down_EFD)))
