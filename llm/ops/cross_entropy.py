"""Token cross-entropy from logits: the one implementation every loss and evaluation uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BTV, targets_BT):
  """(-log p(target), log Z) per position, in fp32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - target_logit_BT, logz_BT
