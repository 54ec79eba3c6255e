"""What the train step minimises: one pure function per `config.train.objective`.

An objective is `fn(params, batch, *, model, config) -> (total, sums)` (with LoRA
dropout it also gets `rng=`, a key for the model's dropout):
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
from llm.model.transformer import Aux, target_nll, unembedding
from llm.ops.cross_entropy import fused_loss

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


def next_token(params, batch, *, model, config, rng=None):
  """Next-token cross-entropy over the loss mask, plus z-loss (train.z_loss x log^2 Z),
  with the head fused into the loss (llm.ops.cross_entropy.fused_loss).
  Metrics: loss (cross-entropy per token), z_loss (mean log^2 Z), auxiliary losses."""
  x_BTD, aux = forward(model, params, batch, rng, head=False)
  mask_BT = batch["loss_mask"]
  total, nll, z = fused_loss(x_BTD, unembedding(params, model.cfg), batch["targets"], mask_BT,
                             z_weight=config.train.z_loss, chunk_len=config.train.loss_chunk)
  tokens = jnp.sum(mask_BT)
  sums = {"loss": nll, "z_loss": z, "weight": tokens}
  return with_aux(total, sums, aux, tokens)


def pair_sums(value_BT, batch):
  """Per (row, pair, side) sums of a per-token value over the loss mask: [B, P + 1, 2]
  (pair 0 is padding; side 1 is the chosen completion, 0 the rejected)."""
  b, t = value_BT.shape
  n_pairs = t // 2 + 1
  index = (jnp.arange(b)[:, None] * n_pairs + batch["pair_ids"]) * 2 + batch["chosen"]
  sums = jax.ops.segment_sum((value_BT * batch["loss_mask"]).reshape(-1), index.reshape(-1),
                             num_segments=b * n_pairs * 2)
  return sums.reshape(b, n_pairs, 2)


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


def dpo(params, batch, *, model, config, rng=None):
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
  policy = pair_sums(-nll_BT, batch)  # summed over each completion's tokens
  ref = pair_sums(batch["ref_logp"], batch)
  tokens = pair_sums(jnp.ones_like(nll_BT), batch)
  valid = (tokens[..., 0] > 0) & (tokens[..., 1] > 0)  # [B, P + 1]: real pairs
  masked = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
  pairs = jnp.sum(valid).astype(jnp.float32)
  if d.loss_type == "ipo":  # TRL's IPO compares per-token average log-probabilities
    avg_policy, avg_ref = policy / jnp.maximum(tokens, 1), ref / jnp.maximum(tokens, 1)
    losses = dpo_losses(avg_policy[..., 1], avg_policy[..., 0], avg_ref[..., 1],
                        avg_ref[..., 0], beta=d.beta, loss_type="ipo")
  else:
    losses = dpo_losses(policy[..., 1], policy[..., 0], ref[..., 1], ref[..., 0], beta=d.beta,
                        loss_type=d.loss_type, label_smoothing=d.label_smoothing)
  total = masked(losses)
  if d.rpo_alpha:  # RPO: TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]:
    # the NLL of every chosen token in the batch, one token mean (times the pairs: the
    # step divides this sum by them)
    chosen_nll = masked(-policy[..., 1]) / jnp.maximum(masked(tokens[..., 1]), 1.0)
    total = total + d.rpo_alpha * chosen_nll * pairs
  # logged from sums whatever the loss (as TRL logs them, IPO included)
  chosen_rewards = d.beta * (policy[..., 1] - ref[..., 1])
  rejected_rewards = d.beta * (policy[..., 0] - ref[..., 0])
  sums = {"loss": total, "rewards/chosen": masked(chosen_rewards),
          "rewards/rejected": masked(rejected_rewards),
          "rewards/accuracies": masked((chosen_rewards > rejected_rewards).astype(jnp.float32)),
          "rewards/margins": masked(chosen_rewards - rejected_rewards),
          "logps/chosen": masked(policy[..., 1]), "logps/rejected": masked(policy[..., 0]),
          # the policy itself prefers the chosen completion (at step 0: the reference does)
          "preference_accuracy": masked((policy[..., 1] > policy[..., 0]).astype(jnp.float32)),
          "weight": pairs}
  return with_aux(total, sums, aux, pairs)


def bradley_terry_losses(chosen, rejected, center_coefficient: float = 0.0, margin=0.0):
  """Per-pair reward-model losses (TRL's RewardTrainer): -log sigmoid(r_chosen -
  r_rejected - margin), plus center_coefficient x (r_chosen + r_rejected)^2 (TRL's
  center_rewards_coefficient; its mean over the pairs is the mean of these terms)."""
  return (-jax.nn.log_sigmoid(chosen - rejected - margin)
          + center_coefficient * jnp.square(chosen + rejected))


def reward(params, batch, *, model, config, rng=None):
  """A reward model (model.head="score") trained on preference pairs with the
  Bradley-Terry loss (less the pair's "margin", TRL's optional column). A sequence's
  reward is the score at its last token (the loss mask
  marks it: llm.data.preference, score_last). Weight: pairs. Metrics with TRL's names:
  accuracy (chosen scored above rejected; held out: eval_accuracy), margin (mean
  r_chosen - r_rejected), mean_reward (over both sides), min_reward and max_reward (per
  batch, averaged over the batches logged, as TRL averages them)."""
  scores_BT, aux = forward(model, params, batch, rng)
  rewards = pair_sums(scores_BT, batch)  # [B, P + 1, 2]: the one masked token's score
  marked = pair_sums(jnp.ones_like(scores_BT), batch)
  valid = (marked[..., 0] > 0) & (marked[..., 1] > 0)
  chosen, rejected = rewards[..., 1], rewards[..., 0]
  margin = pair_sums(batch["margin"], batch)[..., 1]  # the pair's margin (0 if none given)
  losses = bradley_terry_losses(chosen, rejected, config.train.reward.center_coefficient,
                                margin)
  masked = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
  pairs = jnp.sum(valid).astype(jnp.float32)
  total = masked(losses)
  both = jnp.stack([chosen, rejected], -1)
  valid2 = jnp.stack([valid, valid], -1)
  sums = {"loss": total, "accuracy": masked((chosen > rejected).astype(jnp.float32)),
          "margin": masked(chosen - rejected), "mean_reward": masked((chosen + rejected) / 2),
          # the batch's extremes, times the weight (the step divides every sum by it)
          "min_reward": jnp.where(pairs > 0, pairs * jnp.min(jnp.where(valid2, both, jnp.inf)),
                                  0.0),
          "max_reward": jnp.where(pairs > 0, pairs * jnp.max(jnp.where(valid2, both, -jnp.inf)),
                                  0.0),
          "weight": pairs}
  return with_aux(total, sums, aux, pairs)


def grpo_token_losses(logp, old_logp, ref_logp, advantage, *, beta: float, epsilon_low: float,
                      epsilon_high: float, mask=None, level: str = "token",
                      bias_correction_kl: bool = True):
  """(per-token loss, per-token k3 KL, low-clipped, high-clipped) of GRPO as TRL 1.16
  computes them: the importance ratio r = exp(logp - old_logp) per token, or with
  level="sequence" (GSPO) exp of the mean of logp - old_logp over each row's `mask`ed
  tokens, one per row; loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta x KL,
  KL = exp(ref - logp) - (ref - logp) - 1, times r with `bias_correction_kl` (TRL's
  use_bias_correction_kl, on by default: the unbiased reverse-KL gradient)."""
  log_ratio = logp - old_logp
  if level == "sequence":
    log_ratio = (jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
                 / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -jnp.minimum(ratio * advantage, clipped * advantage)
  delta = ref_logp - logp
  kl = jnp.exp(delta) - delta - 1.0
  if bias_correction_kl:
    kl = kl * ratio
  if beta:
    loss = loss + beta * kl
  low = (ratio < 1.0 - epsilon_low) & (advantage < 0)
  high = (ratio > 1.0 + epsilon_high) & (advantage > 0)
  return loss, kl, low, high


def grpo_aggregate(loss_BT, mask_BT, loss_type: str, max_new_tokens: int):
  """(total, weight) of per-token losses over one completion per row; total / weight is
  TRL's loss for `loss_type` (see grpo)."""
  per_row_B = jnp.sum(loss_BT * mask_BT, axis=1)
  tokens_B = jnp.sum(mask_BT, axis=1)
  completions = jnp.sum(tokens_B > 0).astype(jnp.float32)
  if loss_type == "grpo":
    return jnp.sum(per_row_B / jnp.maximum(tokens_B, 1.0)), completions
  if loss_type == "dr_grpo":
    return jnp.sum(per_row_B) / max_new_tokens, completions
  if loss_type == "bnpo":  # this batch's token mean (a batch of the accumulation counts 1)
    return jnp.sum(per_row_B) / jnp.maximum(jnp.sum(tokens_B), 1.0), (
        jnp.sum(tokens_B) > 0).astype(jnp.float32)
  return jnp.sum(per_row_B), jnp.sum(tokens_B)  # dapo


def grpo(params, batch, *, model, config, rng=None):
  """Group relative policy optimisation on rollouts (llm.training.grpo): one completion
  per row, its tokens in the loss mask, with per-token "advantage" (the completion's
  group-normalised reward), "old_logp" (the sampling policy's; with num_iterations=1 the
  policy's own, detached, as TRL does) and "ref_logp" (the reference's, for the KL
  penalty). train.grpo.loss_type aggregates like TRL: dapo, sum over all completion tokens
  / their count (weight: tokens); grpo, each completion's token mean, averaged (weight:
  completions); dr_grpo, sum / max_new_tokens per completion (weight: completions); bnpo,
  the batch's token mean (weight: 1 per batch). Log-probabilities are of logits /
  train.grpo.temperature, the sampling temperature, as TRL scores them (policy, sampling
  policy and reference alike). importance_sampling_level and use_bias_correction_kl as
  in grpo_token_losses. Metrics: kl, clip_ratio/low_mean, clip_ratio/high_mean,
  clip_ratio/region_mean (token means; per-sequence means at the sequence level)."""
  g = config.train.grpo
  nll_BT, aux = target_nll(model, params, batch, chunk_len=config.train.loss_chunk, rng=rng,
                           temperature=g.temperature)
  logp_BT = -nll_BT
  old_BT = batch["old_logp"] if g.num_iterations > 1 else jax.lax.stop_gradient(logp_BT)
  mask_BT = batch["loss_mask"]
  loss_BT, kl_BT, low_BT, high_BT = grpo_token_losses(
      logp_BT, old_BT, batch["ref_logp"], batch["advantage"], beta=g.beta,
      epsilon_low=g.epsilon, epsilon_high=g.epsilon_high or g.epsilon, mask=mask_BT,
      level=g.importance_sampling_level, bias_correction_kl=g.use_bias_correction_kl)
  loss_BT = jnp.broadcast_to(loss_BT, mask_BT.shape)
  total, weight = grpo_aggregate(loss_BT, mask_BT, g.loss_type, g.max_new_tokens)
  tokens = jnp.sum(mask_BT)
  # token means, scaled by the weight so that the step's division by it leaves the mean
  token_mean = lambda x: weight * jnp.sum(x * mask_BT) / jnp.maximum(tokens, 1.0)  # noqa: E731
  rows = jnp.sum(jnp.sum(mask_BT, axis=1) > 0)
  # one value per sequence (GSPO): TRL averages those over the sequences
  clip_mean = token_mean if low_BT.shape[-1] != 1 else (  # noqa: E731
      lambda x: weight * jnp.sum(x[:, 0] * (jnp.sum(mask_BT, axis=1) > 0)) / jnp.maximum(rows, 1))
  sums = {"loss": total, "kl": token_mean(kl_BT),
          "clip_ratio/low_mean": clip_mean(low_BT.astype(jnp.float32)),
          "clip_ratio/high_mean": clip_mean(high_BT.astype(jnp.float32)),
          "clip_ratio/region_mean": clip_mean((low_BT | high_BT).astype(jnp.float32)),
          "weight": weight}
  return with_aux(total, sums, aux, weight)


def reference_logps(params, batch, *, model, config=None, temperature: float = 1.0):
  """Per-token log-probabilities of the targets (the reference for dpo), in the config's
  train.loss_chunk chunks (without a config: the whole sequence at once), of logits /
  `temperature` (GRPO scores at its sampling temperature)."""
  chunk = 0 if config is None else config.train.loss_chunk
  return -target_nll(model, params, batch, chunk_len=chunk, temperature=temperature)[0]


# what a batch holds besides inputs/targets/segment_ids/positions/loss_mask, per objective
EXTRA_BATCH_FIELDS = {"dpo": {"pair_ids": "int32", "chosen": "int32", "ref_logp": "float32"},
                      "reward": {"pair_ids": "int32", "chosen": "int32", "margin": "float32"},
                      "grpo": {"advantage": "float32", "old_logp": "float32",
                               "ref_logp": "float32"}}
# config.train.dpo.loss_type -> per-pair loss (dpo_losses)
DPO_LOSSES = ("sigmoid", "ipo")
# config.train.grpo.loss_type -> how per-token losses are averaged (see grpo)
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo")
# config.train.grpo.importance_sampling_level -> the ratio per token, or per sequence (GSPO)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# objectives whose batches carry "ref_logp" from the starting weights
NEEDS_REFERENCE = ("dpo",)

# config.train.objective -> the objective function. "sft" minimises the same masked
# cross-entropy over chat examples whose loss mask is the assistant's tokens (the data
# side: llm.data.pipeline.is_chat, llm.data.sft).
OBJECTIVES: dict[str, Objective] = {"pretrain": next_token, "sft": next_token, "dpo": dpo,
                                    "reward": reward, "grpo": grpo}
