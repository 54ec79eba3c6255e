"""Logit soft-capping (Gemma 2: attention logits at 50, final logits at 30), the one rule
the attention ops, the fused cross-entropy, distillation and the sampling heads apply.
(The Pallas kernels, a package of their own, carry the same rule in their `scores`.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap x tanh(x / cap); x itself when cap is 0 or None."""
  return x if not cap else cap * jnp.tanh(x / cap)


def soft_cap_grad(d_capped: jax.Array, capped: jax.Array, cap: float | None) -> jax.Array:
  """The gradient w.r.t. the uncapped x from the one w.r.t. capped = soft_cap(x, cap):
  times the cap's derivative 1 - tanh^2 = 1 - (capped / cap)^2."""
  return d_capped if not cap else d_capped * (1.0 - jnp.square(capped / cap))
