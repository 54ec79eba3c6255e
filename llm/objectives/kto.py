"""kto: Kahneman-Tversky optimisation (Ethayarajh et al., 2024) on unpaired examples, each
desirable or not (llm.data.unpaired), against a reference policy (the starting weights,
precomputed or live as for dpo), as TRL 1.16's KTOTrainer computes it. The reference
point, a KL estimate, comes from mismatched sequences in the batch: each example's prompt
with another example's completion, scored by the policy (without gradient) and the
reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import check_range
from llm.data.unpaired import UNPAIRED_FIELDS, UnpairedExamples
from llm.model.transformer import target_nll
from llm.objectives.base import Objective, with_aux
from llm.objectives.dpo import ReferencedBatches
from llm.objectives.pairs import group_sums

# train.kto.loss_type: "kto", or APO-zero's unpaired form (no KL term, no KL sequences)
LOSS_TYPES = ("kto", "apo_zero_unpaired")


def example_sums(value_BT, batch):
  """Per (row, example, sequence) sums of a per-token value over the loss mask: [B, T + 1,
  2] (example 0 is padding; sequence 0 is the example's own completion, 1 its KL
  sequence's)."""
  return group_sums(value_BT, batch["loss_mask"], batch["example_ids"], batch["kl"])


def kto_losses(logratio, kl, desirable, *, beta: float, loss_type: str = "kto",
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """Per-example losses: kto, 1 - sigmoid(beta (h - KL)) for desirable examples and
  1 - sigmoid(beta (KL - h)) for undesirable ones, h the policy-minus-reference
  log-ratio of the completion; apo_zero_unpaired, 1 - sigmoid(beta h) and sigmoid(beta
  h); times desirable_weight or undesirable_weight."""
  if loss_type == "kto":
    chosen = 1.0 - jax.nn.sigmoid(beta * (logratio - kl))
    rejected = 1.0 - jax.nn.sigmoid(beta * (kl - logratio))
  else:
    chosen = 1.0 - jax.nn.sigmoid(beta * logratio)
    rejected = jax.nn.sigmoid(beta * logratio)
  return jnp.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)


def kto_loss(params, batch, *, model, config, rng=None):
  """Mean KTO loss over the batch's examples (weight: examples). The KL estimate is the
  mean over the batch of the KL sequences' policy-minus-reference log-probabilities,
  without gradient, at least 0 (0 for apo_zero_unpaired). Metrics with TRL's names: kl,
  rewards/chosen, rewards/rejected (beta x log-ratio, means over the desirable and the
  undesirable examples), rewards/margins (their difference), logps/chosen,
  logps/rejected (summed completion log-probabilities, means likewise)."""
  k = config.train.kto
  nll_BT, aux = target_nll(model, params, batch, chunk_len=config.train.loss_chunk, rng=rng)
  logps = example_sums(-nll_BT, batch)
  ref = example_sums(batch["ref_logp"], batch)
  tokens = example_sums(jnp.ones_like(nll_BT), batch)
  valid = tokens[..., 0] > 0
  desirable = valid & (example_sums(batch["label"].astype(jnp.float32), batch)[..., 0] > 0)
  undesirable = valid & ~desirable
  n = jnp.sum(valid).astype(jnp.float32)
  total_of = lambda x, where: jnp.sum(jnp.where(where, x, 0.0))  # noqa: E731
  if k.loss_type == "kto":
    kl = total_of(logps[..., 1] - ref[..., 1], valid) / jnp.maximum(n, 1.0)
    kl = jnp.maximum(jax.lax.stop_gradient(kl), 0.0)
  else:
    kl = jnp.zeros(())
  logratio = logps[..., 0] - ref[..., 0]
  losses = kto_losses(logratio, kl, desirable, beta=k.beta, loss_type=k.loss_type,
                      desirable_weight=k.desirable_weight,
                      undesirable_weight=k.undesirable_weight)
  total = total_of(losses, valid)
  rewards = k.beta * logratio
  n_chosen, n_rejected = jnp.sum(desirable), jnp.sum(undesirable)
  mean_of = lambda x, where, count: total_of(x, where) / jnp.maximum(count, 1)  # noqa: E731
  chosen_reward = mean_of(rewards, desirable, n_chosen)
  rejected_reward = mean_of(rewards, undesirable, n_rejected)
  both = (n_chosen > 0) & (n_rejected > 0)
  # batch means, times the weight (the step divides every sum by it)
  sums = {"loss": total, "kl": n * kl, "rewards/chosen": n * chosen_reward,
          "rewards/rejected": n * rejected_reward,
          "rewards/margins": jnp.where(both, n * (chosen_reward - rejected_reward), 0.0),
          "logps/chosen": n * mean_of(logps[..., 0], desirable, n_chosen),
          "logps/rejected": n * mean_of(logps[..., 0], undesirable, n_rejected),
          "weight": n}
  return with_aux(total, sums, aux, n)


class KTOReferencedBatches(ReferencedBatches):
  """Rows whose batches carry the reference's log-probabilities (train.kto.reference)."""
  section = "kto"


def check(config) -> None:
  k = config.train.kto
  check_range("train.kto.beta", k.beta, lo=0, lo_open=True)
  check_range("train.kto.desirable_weight", k.desirable_weight, lo=0, lo_open=True)
  check_range("train.kto.undesirable_weight", k.undesirable_weight, lo=0, lo_open=True)


OBJECTIVE = Objective(loss=kto_loss,
                      data=UnpairedExamples(lambda c: c.train.kto.loss_type == "kto"),
                      fields={**UNPAIRED_FIELDS, "ref_logp": "float32"},
                      batches=KTOReferencedBatches, check=check)
