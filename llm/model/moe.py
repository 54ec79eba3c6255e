"""Sparse mixture-of-experts feed-forward (`model.mlp = "moe"`, settings in `model.moe`).

A router (fp32) scores the experts per token and keeps the top k: softmax over all
experts then top-k, renormalised over the k when `moe.norm_topk_prob` (Mixtral; Qwen3's
`norm_topk_prob`). Each chosen expert is a SwiGLU of width `moe.d_ff`; their outputs are
summed with the routing weights (llm.ops.moe: dropless or capacity compute, expert
parallelism on a mesh), plus `moe.n_shared` always-on experts (one SwiGLU of n_shared x
the width). Expert weights carry the logical axis "experts".

Auxiliary losses (through `add_aux_loss`): the Switch/Mixtral load-balancing loss
n_experts x sum_i f_i P_i (f_i: fraction of assignments to expert i, P_i: its mean router
probability) times `moe.load_balance_weight`, and the router z-loss mean(logsumexp^2)
times `moe.router_z_weight`. Logged per step (`add_aux_metric`): the least/most loaded
expert ratio and the dropped fraction.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model.layers import SwiGLU, add_aux_loss, add_aux_metric, constrain, param_with_axes
from llm.ops.moe import routed_experts


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


def assignments_per_expert(experts_NK, n_experts: int):
  return jnp.zeros((n_experts,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)


def load_balance_loss(probs_NE, experts_NK):
  """n_experts x sum_i f_i P_i, f_i = assignments to expert i / tokens (sums to k)."""
  n, e = probs_NE.shape
  return e * jnp.sum(assignments_per_expert(experts_NK, e) / n * jnp.mean(probs_NE, axis=0))


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
    logits_NE, probs_NE, weights_NK, experts_NK = route(x_BTD.reshape(b * t, d), router_DE,
                                                        m.top_k, m.norm_topk_prob)
    out_BTD, dropped = routed_experts(m.compute, x_BTD, weights_NK.reshape(b, t, -1),
                                      experts_NK.reshape(b, t, -1), gate_EDF, up_EDF, down_EFD,
                                      dtype, m.capacity_factor)
    out_BTD = out_BTD.astype(dtype)
    if m.n_shared:
      out_BTD = out_BTD + SwiGLU(c, self.out_init_std, d_ff=m.n_shared * f, name="shared")(x_BTD)
    if m.load_balance_weight:
      add_aux_loss(self, "moe_load_balance_loss",
                   m.load_balance_weight * load_balance_loss(probs_NE, experts_NK))
    if m.router_z_weight:
      z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))
      add_aux_loss(self, "moe_router_z_loss", m.router_z_weight * z)
    load_E = assignments_per_expert(experts_NK, e)
    add_aux_metric(self, "moe_load_min_over_max", jnp.min(load_E) / jnp.maximum(jnp.max(load_E), 1))
    add_aux_metric(self, "moe_dropped_fraction", dropped)
    return constrain(out_BTD, ("batch", "length", "act_embed"))

  @staticmethod
  def active_fraction(cfg, path: str) -> float:
    """Of the parameter at `path`, the fraction one token goes through: k of the experts."""
    routed = "['mlp']" in path and path.rsplit("[", 1)[-1] in ("'gate']", "'up']", "'down']")
    return cfg.moe.top_k / cfg.moe.n_experts if routed and "['shared']" not in path else 1.0
