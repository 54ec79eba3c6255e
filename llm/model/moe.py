"""Sparse mixture-of-experts feed-forward (`model.mlp = "moe"`, settings in `model.moe`).

A router (fp32) scores the experts per token and keeps the top k: softmax over all
experts then top-k, renormalised over the k when `moe.norm_topk_prob` (Mixtral; Qwen3's
`norm_topk_prob`); or (DeepSeek-V3) sigmoid scores, chosen within the best `topk_groups`
of `n_groups` expert groups, by the scores plus a balancing bias that is not trained but
moved each step by `routed_bias_update_rate` towards even load (auxiliary-loss-free
balancing), the weights scaled by `routed_scaling`. Each chosen expert is a SwiGLU of width `moe.d_ff`; their outputs are
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

from llm.model.layers import (SwiGLU, add_aux_loss, add_aux_metric, add_param_update, constrain,
                              param_with_axes)
from llm.ops.moe import routed_experts


def expert_width(cfg) -> int:
  return cfg.moe.d_ff or cfg.d_ff


def _limit_groups(choice_NE, n_groups: int, topk_groups: int):
  """Group-limited routing (DeepSeek-V3): experts in n_groups equal groups, each scored by
  the sum of its two best choice scores; experts outside the topk_groups best groups are
  masked to -inf."""
  if n_groups <= 1:
    return choice_NE
  n, e = choice_NE.shape
  grouped_NGX = choice_NE.reshape(n, n_groups, e // n_groups)
  group_NG = jnp.sum(jax.lax.top_k(grouped_NGX, min(2, e // n_groups))[0], axis=-1)
  _, best_NK = jax.lax.top_k(group_NG, topk_groups)
  keep_NG = jnp.zeros((n, n_groups), bool).at[jnp.arange(n)[:, None], best_NK].set(True)
  return jnp.where(keep_NG[:, :, None], grouped_NGX, -jnp.inf).reshape(n, e)


def _softmax_scores(logits_NE):
  return jax.nn.softmax(logits_NE, axis=-1)


# model.moe.router -> the router's scores [N, E] from its logits
ROUTERS = {"softmax": _softmax_scores, "sigmoid": jax.nn.sigmoid}


def route(x_ND, router_DE, m, bias_E=None):
  """(router logits [N, E] fp32, probs [N, E], top-k weights [N, k], expert ids [N, k]) by
  the settings m = model.moe: scores per ROUTERS[m.router]; experts chosen by scores +
  bias (the balancing bias, choice only) within the best groups; weights are the chosen
  scores, renormalised over the k with norm_topk_prob, times routed_scaling. `probs` (for
  the load-balancing loss) are the scores normalised to sum to 1 per token."""
  # an einsum: quantized training (qwix) leaves it float; a jnp.dot would reach its
  # dot_general rule for the experts, and jnp.dot's trace cache would carry that across
  logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), router_DE.astype(jnp.float32))
  scores_NE = ROUTERS[m.router](logits_NE)
  choice_NE = scores_NE if bias_E is None else scores_NE + bias_E
  choice_NE = _limit_groups(choice_NE, m.n_groups, m.topk_groups)
  if bias_E is None and m.n_groups <= 1:
    weights_NK, experts_NK = jax.lax.top_k(scores_NE, m.top_k)
  else:
    _, experts_NK = jax.lax.top_k(choice_NE, m.top_k)
    weights_NK = jnp.take_along_axis(scores_NE, experts_NK, axis=-1)
  if m.norm_topk_prob:
    denominator = jnp.sum(weights_NK, axis=-1, keepdims=True)
    weights_NK = weights_NK / (denominator + (1e-20 if m.router == "sigmoid" else 0.0))
  weights_NK = weights_NK * m.routed_scaling
  probs_NE = scores_NE if m.router == "softmax" else scores_NE / jnp.sum(scores_NE, -1,
                                                                           keepdims=True)
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
    bias_E = None
    if m.router == "sigmoid":  # the balancing bias: not trained (moved by load, if at all)
      bias_E = jax.lax.stop_gradient(param_with_axes(
          self, "router_bias", nn.initializers.zeros, (e,), ("experts",), jnp.float32))
    b, t, _ = x_BTD.shape
    logits_NE, probs_NE, weights_NK, experts_NK = route(x_BTD.reshape(b * t, d), router_DE, m,
                                                        bias_E)
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
    if m.routed_bias_update_rate:  # towards even load: underloaded experts up, overloaded down
      add_param_update(self, "router_bias",
                       m.routed_bias_update_rate * jnp.sign(jnp.mean(load_E) - load_E))
    add_aux_metric(self, "moe_load_min_over_max", jnp.min(load_E) / jnp.maximum(jnp.max(load_E), 1))
    add_aux_metric(self, "moe_dropped_fraction", dropped)
    return constrain(out_BTD, ("batch", "length", "act_embed"))

  @staticmethod
  def active_fraction(cfg, path: str) -> float:
    """Of the parameter at `path`, the fraction one token goes through: k of the experts."""
    routed = "['mlp']" in path and path.rsplit("[", 1)[-1] in ("'gate']", "'up']", "'down']")
    return cfg.moe.top_k / cfg.moe.n_experts if routed and "['shared']" not in path else 1.0
