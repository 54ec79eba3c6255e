"""Sparse mixture-of-experts feed-forward (`model.mlp = "moe"`, settings in `model.moe`).

A router (fp32) scores the experts per token and keeps the top k: softmax over all
experts then top-k, renormalised over the k when `moe.norm_topk_prob` (Mixtral; Qwen3's
`norm_topk_prob`). Each chosen expert is a SwiGLU of width `moe.d_ff`; their outputs are
summed with the routing weights, plus `moe.n_shared` always-on experts (one SwiGLU of
n_shared x the width).

Compute (`moe.compute`, COMPUTE):
  - "dropless": the token-expert assignments sorted by expert and run as grouped matmuls
    (`jax.lax.ragged_dot`), every assignment computed;
  - "capacity": einsum dispatch into [experts, capacity, D] buffers of
    capacity_factor x (tokens x k / experts) slots; assignments past an expert's
    capacity are dropped (the fraction is logged).
Auxiliary losses (through `add_aux_loss`): the Switch/Mixtral load-balancing loss
n_experts x sum_i f_i P_i (f_i: fraction of assignments to expert i, P_i: its mean router
probability) times `moe.load_balance_weight`, and the router z-loss mean(logsumexp^2)
times `moe.router_z_weight`. Logged per step (`add_aux_metric`): the least/most loaded
expert ratio and the dropped fraction.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model.layers import SwiGLU, add_aux_loss, add_aux_metric, constrain, param_with_axes


def expert_width(cfg) -> int:
  return cfg.moe.d_ff or cfg.d_ff


def route(x_ND, router_DE, top_k: int, norm_topk_prob: bool):
  """(router logits [N, E] fp32, probs [N, E], top-k weights [N, k], expert ids [N, k])."""
  logits_NE = jnp.dot(x_ND.astype(jnp.float32), router_DE.astype(jnp.float32))
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  weights_NK, experts_NK = jax.lax.top_k(probs_NE, top_k)
  if norm_topk_prob:
    weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
  return logits_NE, probs_NE, weights_NK, experts_NK


def load_balance_loss(probs_NE, experts_NK):
  """n_experts x sum_i f_i P_i, f_i = assignments to expert i / tokens (sums to k)."""
  n, e = probs_NE.shape
  counts_E = jnp.zeros((e,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)
  return e * jnp.sum(counts_E / n * jnp.mean(probs_NE, axis=0))


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


class MoE(nn.Module):
  cfg: object  # the model ConfigDict (settings in cfg.moe)
  out_init_std: float

  @nn.compact
  def __call__(self, x_BTD):
    c, m = self.cfg, self.cfg.moe
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    e, f, d = m.n_experts, expert_width(c), c.d_model
    init = lambda std: nn.initializers.normal(std)  # noqa: E731
    router_DE = param_with_axes(self, "router", init(c.init_std), (d, e), ("embed", "experts"),
                                jnp.float32)
    gate_EDF = param_with_axes(self, "gate", init(c.init_std), (e, d, f),
                               ("experts", "embed", "mlp"), param_dtype)
    up_EDF = param_with_axes(self, "up", init(c.init_std), (e, d, f),
                             ("experts", "embed", "mlp"), param_dtype)
    down_EFD = param_with_axes(self, "down", init(self.out_init_std), (e, f, d),
                               ("experts", "mlp", "embed"), param_dtype)
    b, t, _ = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    logits_NE, probs_NE, weights_NK, experts_NK = route(x_ND, router_DE, m.top_k,
                                                        m.norm_topk_prob)
    kwargs = {"capacity_factor": m.capacity_factor} if m.compute == "capacity" else {}
    out_ND, dropped = COMPUTE[m.compute](x_ND, weights_NK, experts_NK, gate_EDF, up_EDF,
                                         down_EFD, dtype, **kwargs)
    out_BTD = out_ND.reshape(b, t, d).astype(dtype)
    if m.n_shared:
      out_BTD = out_BTD + SwiGLU(c, self.out_init_std, d_ff=m.n_shared * f, name="shared")(x_BTD)
    if m.load_balance_weight:
      add_aux_loss(self, "moe_load_balance_loss",
                   m.load_balance_weight * load_balance_loss(probs_NE, experts_NK))
    if m.router_z_weight:
      z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))
      add_aux_loss(self, "moe_router_z_loss", m.router_z_weight * z)
    load_E = jnp.zeros((e,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)
    add_aux_metric(self, "moe_load_min_over_max", jnp.min(load_E) / jnp.maximum(jnp.max(load_E), 1))
    add_aux_metric(self, "moe_dropped_fraction", dropped)
    return constrain(out_BTD, ("batch", "length", "act_embed"))

  @staticmethod
  def active_fraction(cfg, path: str) -> float:
    """Of the parameter at `path`, the fraction one token goes through: k of the experts."""
    routed = "['mlp']" in path and path.rsplit("[", 1)[-1] in ("'gate']", "'up']", "'down']")
    return cfg.moe.top_k / cfg.moe.n_experts if routed and "['shared']" not in path else 1.0
