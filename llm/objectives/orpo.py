"""orpo: odds-ratio preference optimisation (Hong et al., 2024) on preference pairs, with
no reference model, as TRL 1.16's ORPOTrainer computes it: the NLL of the chosen
sequences (prompt and completion, one token mean over the batch) minus beta times the
mean log-sigmoid of the log odds ratio of the chosen over the rejected completion, whose
log-probabilities are per-token averages."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import check_range
from llm.data.preference import PreferencePairs
from llm.model.transformer import target_nll
from llm.objectives.base import Objective, validation_metrics, with_aux
from llm.objectives.pairs import (PAIR_FIELDS, Pairs, chosen_nll_mean, pair_sums,
                                  preference_metrics)


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, without cancellation (branching at -log 2, each branch fed
  only inputs it is finite on, so that gradients stay finite too)."""
  far = x < -0.6931471805599453
  return jnp.where(far, jnp.log1p(-jnp.exp(jnp.where(far, x, -1.0))),
                   jnp.log(-jnp.expm1(jnp.where(far, -0.5, x))))


def odds_ratio_terms(chosen_logps, rejected_logps):
  """(log sigmoid(log odds ratio), log odds ratio) per pair, from per-token average
  log-probabilities: log odds = (c - r) - (log(1 - e^c) - log(1 - e^r))."""
  log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps)
                                                - log1mexp(rejected_logps))
  return jax.nn.log_sigmoid(log_odds), log_odds


def orpo_loss(params, batch, *, model, config, rng=None):
  """loss = NLL(chosen) - beta x mean log sigmoid(log odds) (train.orpo.beta). Weight:
  pairs. Metrics with TRL's names: rewards/chosen and rewards/rejected (beta x average
  log-probabilities), rewards/accuracies, rewards/margins, logps/chosen, logps/rejected
  (averages), nll_loss, log_odds_ratio (mean log sigmoid of the log odds) and
  log_odds_chosen (mean log odds)."""
  beta = config.train.orpo.beta
  nll_BT, aux = target_nll(model, params, batch, chunk_len=config.train.loss_chunk, rng=rng)
  pairs = Pairs.of(batch)
  logps = pairs.mean_logps(pair_sums(-nll_BT, batch))
  # padding pairs (no tokens) read as a finite stand-in; a probability of 1 (log 0) as
  # just below it, where the odds are finite
  logps = jnp.where(pairs.valid[..., None], jnp.minimum(logps, -1e-7), -1.0)
  chosen, rejected = logps[..., 1], logps[..., 0]
  ratio, log_odds = odds_ratio_terms(chosen, rejected)
  nll = chosen_nll_mean(nll_BT, batch, whole_sequence=True)
  # as sums over the pairs: the step divides by their number
  total = nll * pairs.count - beta * pairs.total(ratio)
  sums = {"loss": total,
          **preference_metrics(pairs, beta * chosen, beta * rejected, chosen, rejected),
          "nll_loss": nll * pairs.count, "log_odds_ratio": pairs.total(ratio),
          "log_odds_chosen": pairs.total(log_odds), "weight": pairs.count}
  return with_aux(total, sums, aux, pairs.count)


def check(config) -> None:
  check_range("train.orpo.beta", config.train.orpo.beta, lo=0)


OBJECTIVE = Objective(loss=orpo_loss, data=PreferencePairs(), fields=PAIR_FIELDS,
                      heldout=validation_metrics, check=check)
