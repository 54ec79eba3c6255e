"""Optax optimizer and learning-rate schedules from config.

AdamW (weight decay masked off norm scales), global-norm clipping, and one of
warmup + cosine, warmup + constant, or warmup-stable-decay (WSD).
"""

from __future__ import annotations

import jax
import optax


def _cosine(c, rest: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(c.lr, rest, alpha=c.min_lr_ratio)


def _constant(c, rest: int) -> optax.Schedule:
  del rest
  return optax.constant_schedule(c.lr)


def _wsd(c, rest: int) -> optax.Schedule:
  """Warmup-stable-decay: constant, then a linear decay over the last decay_fraction."""
  decay = max(int(rest * c.decay_fraction), 1)
  return optax.join_schedules(
      [optax.constant_schedule(c.lr), optax.linear_schedule(c.lr, c.lr * c.min_lr_ratio, decay)],
      [rest - decay])


# config.optim.schedule -> the schedule after warmup, (optim config, steps after warmup)
SCHEDULES = {"cosine": _cosine, "constant": _constant, "wsd": _wsd}


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optim.lr, then the named schedule."""
  c = optim_cfg
  warmup = optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1))
  main = SCHEDULES[c.schedule](c, max(total_steps - c.warmup_steps, 1))
  return optax.join_schedules([warmup, main], [c.warmup_steps])


def decay_mask(params):
  """True for matrices (kernels, embeddings); False for norm scales and biases (the MoE
  balancing bias too, which only its load corrections move)."""

  def decays(path, _):
    name = getattr(path[-1], "key", str(path[-1]))
    return name not in ("scale", "bias", "router_bias")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, over the trainable params (with LoRA the adapters
  alone: `llm.model.lora.trainable`)."""
  c = optim_cfg
  parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
  parts.append(optax.adamw(schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                           weight_decay=c.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
