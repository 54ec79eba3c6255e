"""What the train step minimises: one pure function per `config.train.objective`.

An objective is `fn(params, batch, *, model, config) -> (total, sums)`:
  - `total`: the scalar to minimise, summed over the batch's examples;
  - `sums`: metric sums by name, and "weight" (target tokens, pairs, ...) which divides
    `total` and every other sum. Sums rather than means let gradient accumulation add
    microbatches exactly as one big batch would.
Auxiliary losses the model sows (`llm.model.layers.add_aux_loss`, e.g. MoE load
balancing) reach the objective through `llm.model.forward`; they are added per unit of
weight and logged by name. Adding an objective is a function here plus one line in
`OBJECTIVES`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from llm.model import forward
from llm.model.transformer import Aux
from llm.ops.cross_entropy import token_nll

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def with_aux(total, sums: dict, aux: Aux, weight):
  """Adds the model's auxiliary losses (means over the batch) to `total` as sums, and
  its metrics to `sums` (weighted, so the step's division gives their mean)."""
  for name, value in aux.losses.items():
    total = total + weight * value
    sums[name] = weight * value
  for name, value in aux.metrics.items():
    sums[name] = weight * value
  return total, sums


def next_token(params, batch, *, model, config):
  """Next-token cross-entropy over the loss mask, plus z-loss (train.z_loss x log^2 Z).
  Metrics: loss (cross-entropy per token), z_loss (mean log^2 Z), auxiliary losses."""
  logits_BTV, aux = forward(model, params, batch)
  nll_BT, logz_BT = token_nll(logits_BTV, batch["targets"])
  mask_BT = batch["loss_mask"]
  tokens = jnp.sum(mask_BT)
  nll = jnp.sum(nll_BT * mask_BT)
  z = jnp.sum(jnp.square(logz_BT) * mask_BT)
  sums = {"loss": nll, "z_loss": z, "weight": tokens}
  return with_aux(nll + config.train.z_loss * z, sums, aux, tokens)


# config.train.objective -> the objective function. "sft" minimises the same masked
# cross-entropy over chat examples whose loss mask is the assistant's tokens (the data
# side: llm.data.pipeline.is_chat, llm.data.sft).
OBJECTIVES: dict[str, Objective] = {"pretrain": next_token, "sft": next_token}
