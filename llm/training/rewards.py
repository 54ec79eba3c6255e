"""Reward functions for GRPO (`train.grpo.rewards`), by name, and the group-normalised
advantages built from their weighted sum.

A reward function follows TRL's convention: it is called once per rollout as
`fn(prompts=..., completions=..., **columns)`, where `prompts` are the conversations
(lists of messages), `completions` the generated replies (strings) and every other field
of the prompt records (e.g. `answer`) comes as a list by its name; it returns one float
per completion, or None where it does not apply (left out of the group statistics).
Adding one is a function here plus a line in REWARD_FUNCTIONS.
"""

from __future__ import annotations

import difflib
from typing import Callable

import numpy as np

RewardFunction = Callable[..., list]


def _answers(answer, completions) -> list:
  missing = (list(range(len(completions))) if answer is None else
             [i for i, a in enumerate(answer) if a is None])
  if missing:
    raise ValueError(f"this reward compares with the prompt records' 'answer' field, which "
                     f"completion(s) {missing[:5]} lack: give each prompt an 'answer' (or use "
                     "chat examples ending with the assistant's answer)")
  return answer


def exact_match(completions, answer=None, **_) -> list[float]:
  """1 if the reply equals the answer after stripping surrounding whitespace, else 0."""
  return [float(c.strip() == str(a).strip()) for c, a in zip(completions,
                                                            _answers(answer, completions))]


def similarity(completions, answer=None, **_) -> list[float]:
  """Partial credit: difflib's ratio of the reply to the answer (1 = equal, 0 = nothing in
  common), after stripping surrounding whitespace."""
  return [difflib.SequenceMatcher(None, c.strip(), str(a).strip()).ratio()
          for c, a in zip(completions, _answers(answer, completions))]


def one_line(completions, **_) -> list[float]:
  """A format check: 1 if the reply is a single non-empty line, else 0."""
  return [float(bool(c.strip()) and "\n" not in c.strip()) for c in completions]


# train.grpo.rewards (comma-separated) -> the function
REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "exact_match": exact_match, "similarity": similarity, "one_line": one_line}
# the prompt records' fields a reward function reads (checked before training starts)
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {"exact_match": ("answer",),
                                                "similarity": ("answer",)}
# train.grpo.scale_rewards: divide the centred rewards by the std of the prompt's group,
# of the whole batch, or not at all (Dr. GRPO)
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(x: np.ndarray, axis=None, keepdims=False) -> np.ndarray:
  """Standard deviation ignoring NaNs, with Bessel's correction (TRL's nanstd)."""
  mean = np.nanmean(x, axis=axis, keepdims=True)
  variance = np.nanmean((x - mean) ** 2, axis=axis, keepdims=keepdims)
  count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.sqrt(variance * count / (count - 1))


def group_advantages(rewards: np.ndarray, group: int, scale: str = "group"):
  """(advantages, per-completion std used, per-completion group mean) for rewards [N]
  (NaN: unscorable) in consecutive groups of `group` completions of one prompt, as TRL
  computes them: (r - group mean) / (std + 1e-4), std per group or over the batch (with
  Bessel's correction), or no division for scale="none"; an unscorable completion gets 0."""
  grouped = rewards.reshape(-1, group)
  with np.errstate(invalid="ignore"):
    mean = np.repeat(np.nanmean(grouped, axis=1), group)
  if scale == "batch":
    std = np.full_like(rewards, _nanstd(rewards) if rewards.size > 1 else 0.0)
  else:
    std = np.repeat(_nanstd(grouped, axis=1), group) if group > 1 else np.zeros_like(rewards)
  advantages = rewards - mean
  if scale != "none":
    advantages = advantages / (std + 1e-4)
  return np.nan_to_num(advantages, nan=0.0), std, mean


def weighted_rewards(per_function: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """[N, F] rewards (NaN: does not apply) -> [N]: the weighted sum over the functions that
  apply, NaN where none does (TRL's sum_then_normalize)."""
  total = np.nansum(per_function * weights[None, :], axis=1)
  return np.where(np.isnan(per_function).all(axis=1), np.nan, total)
