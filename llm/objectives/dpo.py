"""dpo: direct preference optimisation on preference pairs (llm.data.preference), against
a reference policy, the run's starting weights (train.dpo.reference: log-probabilities
precomputed once over the data and cached, or live per batch; llm.training.reference).
TRL 1.16's definitions, parameter names and logged metric names."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import check_range
from llm.data.preference import PreferencePairs
from llm.model.transformer import target_nll
from llm.objectives.base import Objective, PackedBatches, with_aux
from llm.objectives.pairs import (PAIR_FIELDS, Pairs, chosen_nll_mean, pair_sums,
                                  preference_metrics)
from llm.training import reference

# train.dpo.loss_type -> per-pair loss (dpo_losses)
LOSS_TYPES = ("sigmoid", "ipo")


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
               loss_type: str, label_smoothing: float = 0.0):
  """Per-pair DPO losses (TRL's definitions): sigmoid, -log sigmoid(beta h) (with label
  smoothing eps: (1 - eps) of that plus eps x -log sigmoid(-beta h)), or ipo,
  (h - 1 / (2 beta))^2, where h = (policy_chosen - policy_rejected) - (ref_chosen -
  ref_rejected) in log-probabilities (IPO: per-token averages)."""
  h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
  if loss_type == "ipo":
    return jnp.square(h - 1.0 / (2.0 * beta))
  return (-jax.nn.log_sigmoid(beta * h) * (1.0 - label_smoothing)
          - jax.nn.log_sigmoid(-beta * h) * label_smoothing)


def dpo_loss(params, batch, *, model, config, rng=None):
  """Direct preference optimisation against reference log-probabilities that the batch
  carries per token ("ref_logp", computed once with the starting weights: the frozen
  reference costs no second copy of the model). Weight: pairs. Metrics with TRL's names:
  rewards/chosen, rewards/rejected (beta x policy-minus-reference log-probabilities),
  rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, all from summed
  log-probabilities as TRL 1.16 logs them (IPO too, though its loss compares per-token
  averages); and preference_accuracy, the fraction of pairs whose chosen completion the
  policy itself finds likelier. train.dpo.rpo_alpha adds TRL's "sft" loss term with that
  weight: the chosen tokens' NLL, one token mean over the batch."""
  d = config.train.dpo
  nll_BT, aux = target_nll(model, params, batch, chunk_len=config.train.loss_chunk, rng=rng)
  pairs = Pairs.of(batch)
  policy = pair_sums(-nll_BT, batch)  # summed over each completion's tokens
  ref = pair_sums(batch["ref_logp"], batch)
  if d.loss_type == "ipo":  # TRL's IPO compares per-token average log-probabilities
    avg_policy, avg_ref = pairs.mean_logps(policy), pairs.mean_logps(ref)
    losses = dpo_losses(avg_policy[..., 1], avg_policy[..., 0], avg_ref[..., 1],
                        avg_ref[..., 0], beta=d.beta, loss_type="ipo")
  else:
    losses = dpo_losses(policy[..., 1], policy[..., 0], ref[..., 1], ref[..., 0], beta=d.beta,
                        loss_type=d.loss_type, label_smoothing=d.label_smoothing)
  total = pairs.total(losses)
  if d.rpo_alpha:  # RPO: TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]:
    # the NLL of every chosen token in the batch, one token mean (times the pairs: the
    # step divides this sum by them)
    total = total + d.rpo_alpha * chosen_nll_mean(nll_BT, batch) * pairs.count
  # logged from sums whatever the loss (as TRL logs them, IPO included)
  chosen_rewards = d.beta * (policy[..., 1] - ref[..., 1])
  rejected_rewards = d.beta * (policy[..., 0] - ref[..., 0])
  sums = {"loss": total,
          **preference_metrics(pairs, chosen_rewards, rejected_rewards, policy[..., 1],
                               policy[..., 0]),
          # the policy itself prefers the chosen completion (at step 0: the reference does)
          "preference_accuracy": pairs.total((policy[..., 1] > policy[..., 0])
                                             .astype(jnp.float32)),
          "weight": pairs.count}
  return with_aux(total, sums, aux, pairs.count)


class ReferencedBatches(PackedBatches):
  """Packed rows whose batches carry "ref_logp", the reference policy's per-token
  log-probabilities: read from the rows (train.dpo.reference="precomputed": computed once
  over the train and validation rows with the starting weights, before any row is read),
  or computed per batch ("live"; a LoRA run's reference is its own base, any other run
  keeps a copy of the starting weights)."""

  section = "dpo"  # the config section whose `reference` says which (train.<section>)

  def __init__(self, objective, run):
    self.live = run.config.train[self.section].reference == "live"
    if not self.live:
      reference.attach(run.config, run.workdir.data, run.corpus, run.model, run.initial_params,
                       run.batch_sharding.mesh, run.batch_sharding, run.param_shardings)
    super().__init__(objective, run)
    if self.live:  # added to each batch as it is used
      self.keys = tuple(k for k in self.keys if k != "ref_logp")

  def start(self, state, step: int) -> None:
    super().start(state, step)
    if self.live:
      run = self.run
      self.reference = reference.LiveReference(
          run.model, run.batch_sharding, run.param_shardings, run.config,
          None if run.lora else run.initial_params())
      # the reference does not move: once for the fixed validation batches
      self.val = [self.reference.attach(b, state.params) for b in self.val]

  def next(self, state, step: int) -> dict:
    batch = super().next(state, step)
    return self.reference.attach(batch, state.params) if self.live else batch


def check(config) -> None:
  d = config.train.dpo
  check_range("train.dpo.beta", d.beta, lo=0, lo_open=True)
  check_range("train.dpo.label_smoothing", d.label_smoothing, lo=0, hi=0.5, hi_open=True)
  if d.loss_type == "ipo" and d.label_smoothing:
    raise ValueError(f"train.dpo.label_smoothing={d.label_smoothing} applies to the sigmoid "
                     "loss (conservative DPO); train.dpo.loss_type='ipo' has no label "
                     "smoothing: set it to 0 or use loss_type 'sigmoid'")
  check_range("train.dpo.rpo_alpha", d.rpo_alpha, lo=0)


OBJECTIVE = Objective(loss=dpo_loss, data=PreferencePairs(),
                      fields={**PAIR_FIELDS, "ref_logp": "float32"},
                      batches=ReferencedBatches, check=check)
