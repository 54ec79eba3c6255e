"""grpo: group relative policy optimisation, as TRL 1.16's GRPOTrainer. Its data are
prompts (llm.data.prompts); its batches are rounds the policy samples and the rewards
score (llm.training.rollouts), whose rows it checkpoints beside the train state; its
evaluation is the reward of greedy replies to held-out prompts; its reference is the
starting weights (a LoRA run's base), kept only when beta > 0."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm.config import check_range, comma_list
from llm.data.prompts import PROMPTS
from llm.model.transformer import target_nll
from llm.objectives.base import Objective, with_aux
from llm.serve.request import MAX_N
from llm.training.rewards import REWARD_FUNCTIONS
from llm.training.rollouts import Rollouts, uses_old_logp

# train.grpo.loss_type -> how per-token losses are averaged (see grpo_loss)
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
# train.grpo.importance_sampling_level -> the ratio per token, or per sequence (GSPO)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def grpo_token_losses(logp, old_logp, ref_logp, advantage, *, beta: float, epsilon_low: float,
                      epsilon_high: float, mask=None, level: str = "token",
                      bias_correction_kl: bool = True, is_ratio=None):
  """(per-token loss, per-token k3 KL, low-clipped, high-clipped) of GRPO as TRL 1.16
  computes them: the importance ratio r = exp(logp - old_logp) per token, or with
  level="sequence" (GSPO) exp of the mean of logp - old_logp over each row's `mask`ed
  tokens, one per row; loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) x is_ratio
  (the sampler correction, importance_sampling_ratio; None: 1) + beta x KL,
  KL = exp(ref - logp) - (ref - logp) - 1, times r with `bias_correction_kl` (TRL's
  use_bias_correction_kl, on by default: the unbiased reverse-KL gradient)."""
  log_ratio = logp - old_logp
  if level == "sequence":
    log_ratio = (jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
                 / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -jnp.minimum(ratio * advantage, clipped * advantage)
  if is_ratio is not None:
    loss = loss * is_ratio
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


def grpo_loss(params, batch, *, model, config, rng=None):
  """Group relative policy optimisation on rollouts (llm.training.rollouts): one completion
  per row, its tokens in the loss mask, with per-token "advantage" (the completion's
  group-normalised reward), "old_logp" (the sampling policy's, by the trainer or the
  sampler, train.grpo.old_logps; unless uses_old_logp, the policy's own, detached, as TRL
  does), "ref_logp" (the reference's, for the KL penalty) and "is_ratio" (the sampler
  correction, train.grpo.importance_sampling_correction). train.grpo.loss_type aggregates like TRL: dapo, sum over all completion tokens
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
  old_BT = batch["old_logp"] if uses_old_logp(g) else jax.lax.stop_gradient(logp_BT)
  mask_BT = batch["loss_mask"]
  loss_BT, kl_BT, low_BT, high_BT = grpo_token_losses(
      logp_BT, old_BT, batch["ref_logp"], batch["advantage"], beta=g.beta,
      epsilon_low=g.epsilon, epsilon_high=g.epsilon_high or g.epsilon, mask=mask_BT,
      level=g.importance_sampling_level, bias_correction_kl=g.use_bias_correction_kl,
      is_ratio=batch["is_ratio"] if g.importance_sampling_correction != "none" else None)
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


def check(config) -> None:
  g, t = config.train.grpo, config.train
  check_range("train.grpo.num_generations", g.num_generations, lo=2,
              note="advantages compare completions of one prompt")
  if t.batch_size % g.num_generations:
    raise ValueError(f"train.batch_size={t.batch_size} (completions per step) must be a multiple "
                     f"of train.grpo.num_generations={g.num_generations}")
  check_range("train.grpo.max_new_tokens", g.max_new_tokens, lo=1, hi=config.data.seq_len - 1,
              note="below data.seq_len, which holds prompt and completion")
  check_range("train.grpo.temperature", g.temperature, lo=0, lo_open=True,
              note="sampling needs a positive temperature")
  check_range("train.grpo.top_k", g.top_k, lo=0, note="0 is off")
  check_range("train.grpo.top_p", g.top_p, lo=0, hi=1, lo_open=True, note="1 is off")
  check_range("train.grpo.beta", g.beta, lo=0)
  check_range("train.grpo.epsilon", g.epsilon, lo=0, lo_open=True)
  check_range("train.grpo.epsilon_high", g.epsilon_high, lo=0, note="0 = epsilon")
  check_range("train.grpo.num_iterations", g.num_iterations, lo=1)
  check_range("train.grpo.eval_prompts", g.eval_prompts, lo=1)
  check_range("train.grpo.importance_sampling_clip_max", g.importance_sampling_clip_max,
              lo=0, lo_open=True)
  check_range("train.grpo.importance_sampling_clip_min", g.importance_sampling_clip_min,
              lo=0, hi=g.importance_sampling_clip_max, hi_open=True,
              note="0 is no lower bound; below clip_max")
  if t.sampler == "engine" and g.num_generations > MAX_N:
    raise ValueError(f"train.grpo.num_generations={g.num_generations} exceeds the engine's "
                     f"{MAX_N} samples per prompt (train.sampler='engine')")
  needs = [f"{k}={v!r}" for k, v in (("old_logps", g.old_logps),
                                     ("importance_sampling_correction",
                                      g.importance_sampling_correction))
           if v not in ("trainer", "none")]
  if needs and t.sampler != "engine":
    raise ValueError(f"train.grpo.{needs[0]} needs the sampler's log-probabilities, which "
                     f"train.sampler={t.sampler!r} does not return; use train.sampler='engine'")
  if len(needs) == 2:
    raise ValueError(f"train.grpo.importance_sampling_correction="
                     f"{g.importance_sampling_correction!r} weighs the trainer's log-"
                     "probabilities against the sampler's, but old_logps='sampler' computes "
                     "none of the trainer's; use old_logps='trainer' with a correction")
  names = comma_list(g.rewards)
  allowed = REWARD_FUNCTIONS
  if any(n not in allowed for n in names):
    raise ValueError(f"train.grpo.rewards={g.rewards!r}: allowed reward functions are "
                     f"{list(allowed)} (comma-separated)")
  n_rewards = len(names) + bool(g.reward_model)
  if not n_rewards:
    raise ValueError("train.grpo needs a reward: name functions in train.grpo.rewards or a "
                     "reward-model workdir in train.grpo.reward_model")
  weights = comma_list(g.reward_weights)
  if weights:
    try:
      values = [float(w) for w in weights]
    except ValueError:
      raise ValueError(f"train.grpo.reward_weights={g.reward_weights!r} must be numbers "
                       "(comma-separated)") from None
    if not all(math.isfinite(v) for v in values) or not any(values):
      raise ValueError(f"train.grpo.reward_weights={g.reward_weights!r} must be finite numbers, "
                       "not all 0 (the reward would be constant, so every advantage 0)")
    if len(weights) != n_rewards:
      raise ValueError(f"train.grpo.reward_weights={g.reward_weights!r} has {len(weights)} "
                       f"weight(s) for {n_rewards} reward(s) ({names}"
                       f"{' + reward_model' if g.reward_model else ''})")


OBJECTIVE = Objective(loss=grpo_loss, data=PROMPTS,
                      fields={"advantage": "float32", "old_logp": "float32",
                              "ref_logp": "float32", "is_ratio": "float32"},
                      batches=Rollouts, check=check)
