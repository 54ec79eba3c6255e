"""Routed experts: tokens to their chosen experts' SwiGLUs and back, weighted and summed.

`routed_experts(...)` picks the compute (`model.moe.compute`, COMPUTE) and, when the
ambient mesh has an "expert" axis, runs expert parallelism:
  - "dropless": the token-expert assignments sorted by expert and run as grouped matmuls
    (`jax.lax.ragged_dot`), every assignment computed;
  - "capacity": einsum dispatch into [experts, capacity, D] buffers of
    capacity_factor x (tokens x k / experts) slots, served first-choice first in token
    order; assignments past an expert's capacity are dropped (the fraction is returned).
  - expert parallel (mesh.expert > 1, dropless): inside shard_map each device gathers the
    tokens of its expert group (all-gather over "expert"), runs the assignments to its own
    experts as grouped matmuls (the others give zero rows), and the partial sums go back
    to the tokens' owners by reduce-scatter. Every assignment is computed exactly once.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm.parallel.rules import logical_to_spec

EXPERT_AXIS = "expert"


def _swiglu_experts(x_MD, gate_EDF, up_EDF, down_EFD, group_sizes_E, dtype):
  """Each row of x through its expert's SwiGLU; rows sorted by expert, group_sizes_E of each."""
  x_MD = x_MD.astype(dtype)
  gate_MF = jax.lax.ragged_dot(x_MD, gate_EDF.astype(dtype), group_sizes_E)
  up_MF = jax.lax.ragged_dot(x_MD, up_EDF.astype(dtype), group_sizes_E)
  return jax.lax.ragged_dot(nn.silu(gate_MF) * up_MF, down_EFD.astype(dtype), group_sizes_E)


def dropless(x_ND, weights_NK, experts_NK, gate_EDF, up_EDF, down_EFD, dtype):
  """(out [N, D], dropped fraction 0) with every assignment computed by grouped matmuls."""
  n, k = experts_NK.shape
  e = gate_EDF.shape[0]
  flat_expert = experts_NK.reshape(-1)  # assignment a = token a // k, slot a % k
  order = jnp.argsort(flat_expert, stable=True)
  group_sizes_E = jnp.zeros((e,), jnp.int32).at[flat_expert].add(1)
  sorted_x = jnp.take(x_ND, order // k, axis=0)
  out_sorted = _swiglu_experts(sorted_x, gate_EDF, up_EDF, down_EFD, group_sizes_E, dtype)
  out_AD = jnp.zeros_like(out_sorted).at[order].set(out_sorted)  # back to assignment order
  out_ND = jnp.sum(out_AD.reshape(n, k, -1) * weights_NK[..., None].astype(out_AD.dtype), axis=1)
  return out_ND, jnp.float32(0.0)


def capacity(x_ND, weights_NK, experts_NK, gate_EDF, up_EDF, down_EFD, dtype,
             capacity_factor: float):
  """(out [N, D], dropped fraction) with fixed [E, C] expert buffers; assignments are
  served in token order (first slot k=0 of every token first), overflow dropped."""
  n, k = experts_NK.shape
  e = gate_EDF.shape[0]
  cap = max(1, math.ceil(capacity_factor * n * k / e))
  onehot_KNE = jax.nn.one_hot(experts_NK.T, e, dtype=jnp.int32)  # slot-major priority
  position_KNE = jnp.cumsum(onehot_KNE.reshape(k * n, e), axis=0).reshape(k, n, e) - 1
  kept_KNE = onehot_KNE * (position_KNE < cap)
  dispatch_NEC = jnp.einsum("kne,knec->nec", kept_KNE,
                            jax.nn.one_hot(position_KNE, cap, dtype=jnp.int32)).astype(dtype)
  combine_NEC = jnp.einsum("kne,kn,knec->nec", kept_KNE.astype(jnp.float32), weights_NK.T,
                           jax.nn.one_hot(position_KNE, cap, dtype=jnp.float32)).astype(dtype)
  x_ECD = jnp.einsum("nec,nd->ecd", dispatch_NEC, x_ND.astype(dtype))
  gate_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, gate_EDF.astype(dtype))
  up_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, up_EDF.astype(dtype))
  y_ECD = jnp.einsum("ecf,efd->ecd", nn.silu(gate_ECF) * up_ECF, down_EFD.astype(dtype))
  out_ND = jnp.einsum("nec,ecd->nd", combine_NEC, y_ECD)
  dropped = 1.0 - jnp.sum(kept_KNE).astype(jnp.float32) / (n * k)
  return out_ND, dropped


# config.model.moe.compute -> how routed tokens reach their experts
COMPUTE = {"dropless": dropless, "capacity": capacity}


def _expert_parallel(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD, dtype, mesh):
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
                               group_sizes, dtype)  # rows of other devices' experts: 0
    y_AD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    partial = jnp.sum(y_AD.reshape(-1, k, d) * w_all.reshape(-1, k, 1).astype(y_AD.dtype), axis=1)
    partial = partial.reshape(x_all.shape)
    if not split:
      return jax.lax.psum(partial, EXPERT_AXIS)
    return jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(token_spec, token_spec, token_spec, expert_spec, expert_spec,
                                 expert_spec),
                       out_specs=token_spec)(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF,
                                             down_EFD)


def routed_experts(compute: str, x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD,
                   dtype, capacity_factor: float):
  """(out [B, T, D], dropped fraction) by the named compute on the ambient mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  ep = 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)
  if ep > 1:
    if compute != "dropless":
      raise ValueError(f"expert parallelism (mesh.expert={ep}) runs dropless experts only; "
                       f"set model.moe.compute='dropless' (got {compute!r})")
    if gate_EDF.shape[0] % ep:
      raise ValueError(f"model.moe.n_experts={gate_EDF.shape[0]} must be divisible by "
                       f"mesh.expert={ep}")
    return (_expert_parallel(x_BTD, weights_BTK, experts_BTK, gate_EDF, up_EDF, down_EFD,
                             dtype, mesh), jnp.float32(0.0))
  b, t, d = x_BTD.shape
  k = experts_BTK.shape[-1]
  kwargs = {"capacity_factor": capacity_factor} if compute == "capacity" else {}
  out_ND, dropped = COMPUTE[compute](x_BTD.reshape(b * t, d), weights_BTK.reshape(b * t, k),
                                     experts_BTK.reshape(b * t, k), gate_EDF, up_EDF,
                                     down_EFD, dtype, **kwargs)
  return out_ND.reshape(b, t, d), dropped
