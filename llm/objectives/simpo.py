"""simpo: simple preference optimisation (Meng et al., 2024) on preference pairs, with no
reference model, as TRL 1.16's CPOTrainer computes it with loss_type="simpo": a margin of
length-normalised (per-token average) log-probabilities against a target gamma, with
TRL's CPO options (label smoothing, the chosen NLL term cpo_alpha, AlphaPO's alpha)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import check_range
from llm.data.preference import PreferencePairs
from llm.model.transformer import target_nll
from llm.objectives.base import Objective, validation_metrics, with_aux
from llm.objectives.pairs import (PAIR_FIELDS, Pairs, chosen_nll_mean, pair_sums,
                                  preference_metrics)


def simpo_losses(chosen_logps, rejected_logps, *, beta: float, gamma: float,
                 label_smoothing: float = 0.0, alpha: float = 0.0):
  """(per-pair losses, chosen rewards, rejected rewards): with h = c - r (or with AlphaPO's
  alpha != 0 the difference of (1 - p^-alpha) / alpha, p = e^logp) less gamma / beta,
  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); rewards are beta x c and
  beta x r (transformed likewise with alpha)."""
  if alpha:
    chosen_logps = (1.0 - jnp.exp(-alpha * chosen_logps)) / alpha
    rejected_logps = (1.0 - jnp.exp(-alpha * rejected_logps)) / alpha
  h = chosen_logps - rejected_logps - gamma / beta
  losses = (-jax.nn.log_sigmoid(beta * h) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * h) * label_smoothing)
  return losses, beta * chosen_logps, beta * rejected_logps


def simpo_loss(params, batch, *, model, config, rng=None):
  """mean SimPO loss + cpo_alpha x the chosen completions' NLL (a token mean over the
  batch; TRL's CPO-SimPO when > 0). Weight: pairs. Metrics with TRL's names:
  rewards/chosen|rejected|accuracies|margins, logps/chosen|rejected (per-token
  averages), nll_loss (0 when cpo_alpha is 0, as TRL skips it)."""
  s = config.train.simpo
  nll_BT, aux = target_nll(model, params, batch, chunk_len=config.train.loss_chunk, rng=rng)
  pairs = Pairs.of(batch)
  logps = pairs.mean_logps(pair_sums(-nll_BT, batch))
  chosen, rejected = logps[..., 1], logps[..., 0]
  losses, chosen_rewards, rejected_rewards = simpo_losses(
      chosen, rejected, beta=s.beta, gamma=s.simpo_gamma, label_smoothing=s.label_smoothing,
      alpha=s.alpha)
  nll = chosen_nll_mean(nll_BT, batch) if s.cpo_alpha else jnp.zeros(())
  total = pairs.total(losses) + s.cpo_alpha * nll * pairs.count
  sums = {"loss": total,
          **preference_metrics(pairs, chosen_rewards, rejected_rewards, chosen, rejected),
          "nll_loss": nll * pairs.count, "weight": pairs.count}
  return with_aux(total, sums, aux, pairs.count)


def check(config) -> None:
  s = config.train.simpo
  check_range("train.simpo.beta", s.beta, lo=0, lo_open=True)
  check_range("train.simpo.simpo_gamma", s.simpo_gamma, lo=0)
  check_range("train.simpo.label_smoothing", s.label_smoothing, lo=0, hi=0.5, hi_open=True)
  check_range("train.simpo.cpo_alpha", s.cpo_alpha, lo=0)


OBJECTIVE = Objective(loss=simpo_loss, data=PreferencePairs(), fields=PAIR_FIELDS,
                      heldout=validation_metrics, check=check)
