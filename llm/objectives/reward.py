"""reward: a reward model (model.head="score") trained on preference pairs with the
Bradley-Terry loss, as TRL 1.16's RewardTrainer. llm.evaluate reports its metrics
(accuracy, margin, ...) over all the validation pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import check_range
from llm.data.preference import PreferencePairs
from llm.model import forward
from llm.objectives.base import Objective, validation_metrics, with_aux
from llm.objectives.pairs import PAIR_FIELDS, Pairs, pair_sums


def bradley_terry_losses(chosen, rejected, center_coefficient: float = 0.0, margin=0.0):
  """Per-pair reward-model losses (TRL's RewardTrainer): -log sigmoid(r_chosen -
  r_rejected - margin), plus center_coefficient x (r_chosen + r_rejected)^2 (TRL's
  center_rewards_coefficient; its mean over the pairs is the mean of these terms)."""
  return (-jax.nn.log_sigmoid(chosen - rejected - margin)
          + center_coefficient * jnp.square(chosen + rejected))


def reward_loss(params, batch, *, model, config, rng=None):
  """A reward model (model.head="score") trained on preference pairs with the
  Bradley-Terry loss (less the pair's "margin", TRL's optional column). A sequence's
  reward is the score at its last token (the loss mask
  marks it: llm.data.preference, score_last). Weight: pairs. Metrics with TRL's names:
  accuracy (chosen scored above rejected; held out: eval_accuracy), margin (mean
  r_chosen - r_rejected), mean_reward (over both sides), min_reward and max_reward (per
  batch, averaged over the batches logged, as TRL averages them)."""
  scores_BT, aux = forward(model, params, batch, rng)
  rewards = pair_sums(scores_BT, batch)  # [B, T + 1, 2]: the one masked token's score
  pairs = Pairs.of(batch)
  chosen, rejected = rewards[..., 1], rewards[..., 0]
  margin = pair_sums(batch["margin"], batch)[..., 1]  # the pair's margin (0 if none given)
  losses = bradley_terry_losses(chosen, rejected, config.train.reward.center_coefficient,
                                margin)
  masked, n = pairs.total, pairs.count
  total = masked(losses)
  both = jnp.stack([chosen, rejected], -1)
  valid2 = jnp.stack([pairs.valid, pairs.valid], -1)
  sums = {"loss": total, "accuracy": masked((chosen > rejected).astype(jnp.float32)),
          "margin": masked(chosen - rejected), "mean_reward": masked((chosen + rejected) / 2),
          # the batch's extremes, times the weight (the step divides every sum by it)
          "min_reward": jnp.where(n > 0, n * jnp.min(jnp.where(valid2, both, jnp.inf)), 0.0),
          "max_reward": jnp.where(n > 0, n * jnp.max(jnp.where(valid2, both, -jnp.inf)), 0.0),
          "weight": n}
  return with_aux(total, sums, aux, n)


def check(config) -> None:
  check_range("train.reward.center_coefficient", config.train.reward.center_coefficient, lo=0)


OBJECTIVE = Objective(loss=reward_loss, data=PreferencePairs(score_last=True),
                      fields={**PAIR_FIELDS, "margin": "float32"},
                      head="score", heldout=validation_metrics, check=check)
