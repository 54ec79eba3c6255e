"""Optax optimizer and learning-rate schedules from config.

AdamW (weight decay masked off norm scales), global-norm clipping, and one of
warmup + cosine, warmup + constant, or warmup-stable-decay (WSD).
"""

from __future__ import annotations

import jax
import optax


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  c = optim_cfg
  warmup = optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1))
  rest = max(total_steps - c.warmup_steps, 1)
  min_lr = c.lr * c.min_lr_ratio
  if c.schedule == "cosine":
    main = optax.cosine_decay_schedule(c.lr, rest, alpha=c.min_lr_ratio)
  elif c.schedule == "constant":
    main = optax.constant_schedule(c.lr)
  elif c.schedule == "wsd":
    decay = max(int(rest * c.decay_fraction), 1)
    main = optax.join_schedules(
        [optax.constant_schedule(c.lr), optax.linear_schedule(c.lr, min_lr, decay)], [rest - decay])
  else:
    raise ValueError(f"optim.schedule={c.schedule!r} is not one of cosine, constant, wsd")
  return optax.join_schedules([warmup, main], [c.warmup_steps])


def decay_mask(params):
  """True for matrices (kernels, embeddings); False for norm scales and biases."""

  def decays(path, _):
    name = getattr(path[-1], "key", str(path[-1]))
    return name not in ("scale", "bias")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  c = optim_cfg
  parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
  parts.append(optax.adamw(schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                           weight_decay=c.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
