"""What the objectives on preference pairs share (dpo, orpo, simpo, reward): per-pair sums
of per-token values over rows that hold both sides of each pair (llm.data.preference).

Per token, a row's `pair_ids` number its pairs from 1 (0: padding) and `chosen` is 1 on
the chosen sequence and 0 on the rejected one; `loss_mask` marks each completion's
tokens (a reward model's: the last token alone).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# the [B, T] arrays a batch of pairs holds besides the packed rows' own
PAIR_FIELDS = {"pair_ids": "int32", "chosen": "int32"}


def group_sums(value_BT, mask_BT, group_BT, side_BT):
  """Per (row, group, side) sums of a per-token value over `mask_BT`: [B, T + 1, 2], where
  `group_BT` numbers the groups of a row from 1 (0: padding; a group has at least one
  token, so a row has at most T) and `side_BT` is 0 or 1."""
  b, t = value_BT.shape
  n_groups = t + 1
  index = (jnp.arange(b)[:, None] * n_groups + group_BT) * 2 + side_BT
  sums = jax.ops.segment_sum((value_BT * mask_BT).reshape(-1), index.reshape(-1),
                             num_segments=b * n_groups * 2)
  return sums.reshape(b, n_groups, 2)


def pair_sums(value_BT, batch, mask_BT=None):
  """Per (row, pair, side) sums of a per-token value over `mask_BT` (default: the loss
  mask): [B, T + 1, 2] (pair 0 is padding; side 1 is the chosen sequence, 0 the rejected)."""
  mask_BT = batch["loss_mask"] if mask_BT is None else mask_BT
  return group_sums(value_BT, mask_BT, batch["pair_ids"], batch["chosen"])


@dataclasses.dataclass(frozen=True)
class Pairs:
  """The real pairs of a batch: `valid` [B, T + 1] (both sides have tokens in the loss
  mask), `count` (how many, float: the objectives' weight) and `tokens` [B, T + 1, 2]
  (each side's tokens in the loss mask)."""
  valid: jax.Array
  count: jax.Array
  tokens: jax.Array

  @classmethod
  def of(cls, batch) -> "Pairs":
    tokens = pair_sums(jnp.ones(batch["loss_mask"].shape, jnp.float32), batch)
    valid = (tokens[..., 0] > 0) & (tokens[..., 1] > 0)
    return cls(valid, jnp.sum(valid).astype(jnp.float32), tokens)

  def total(self, x_BP):
    """The sum of a per-pair value over the real pairs."""
    return jnp.sum(jnp.where(self.valid, x_BP, 0.0))

  def mean_logps(self, sums_BP2):
    """Per-token averages of per-side sums (TRL's average_log_prob)."""
    return sums_BP2 / jnp.maximum(self.tokens, 1.0)


def chosen_nll_mean(nll_BT, batch, whole_sequence: bool = False):
  """The NLL of the chosen sequences' tokens, one token mean over the batch (TRL's
  nn.CrossEntropyLoss over the chosen rows' labels): the completions' tokens, or with
  `whole_sequence` every predicted token, prompt included (ORPO's)."""
  mask_BT = batch["loss_mask"]
  if whole_sequence:
    mask_BT = (batch["segment_ids"] > 0).astype(jnp.float32)
  mask_BT = mask_BT * (batch["chosen"] == 1)
  return jnp.sum(nll_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def preference_metrics(pairs: Pairs, chosen_rewards, rejected_rewards, chosen_logps,
                       rejected_logps) -> dict:
  """TRL's logged preference metrics as sums over the real pairs (the step divides them by
  the weight, the number of pairs): rewards/chosen|rejected|accuracies|margins and
  logps/chosen|rejected."""
  return {"rewards/chosen": pairs.total(chosen_rewards),
          "rewards/rejected": pairs.total(rejected_rewards),
          "rewards/accuracies": pairs.total((chosen_rewards > rejected_rewards)
                                            .astype(jnp.float32)),
          "rewards/margins": pairs.total(chosen_rewards - rejected_rewards),
          "logps/chosen": pairs.total(chosen_logps),
          "logps/rejected": pairs.total(rejected_logps)}
