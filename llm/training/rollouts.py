"""Rollouts: the batches GRPO trains on (llm.objectives.grpo), sampled rounds.

Every `train.grpo.num_iterations` steps a round begins: the next
train.batch_size / num_generations prompts are each completed num_generations times by
the current policy (train.sampler, llm.training.samplers: by default the serving engine,
continuously batched over the round, the samples of a prompt sharing its prompt's pages,
reading the trainer's params in place), the completions are scored by the reward
functions and/or reward model, and their rewards normalised within each prompt's group
into advantages (llm.training.rewards). The round's rows (prompt + completion, the
completion's tokens in the loss mask) carry per token the advantage, the sampling
policy's log-probabilities (old_logp: the trainer's forward pass over the round, or with
train.grpo.old_logps="sampler" the engine's own), the sampler correction (is_ratio) and
the reference's log-probabilities (ref_logp, when beta > 0: the starting weights; with
LoRA the base without adapters, so no second copy is held). The loss is
llm.objectives.grpo's.

Parity: with the engine and old_logps="trainer", each round logs how far the engine's
log-probabilities of the sampled tokens are from the trainer's (TRL's names,
sampling/sampling_logp_difference/mean|max, over the completion tokens), and with a
correction the importance ratios' min/mean/max (sampling/importance_sampling_ratio/*).

Exact resume: the prompts come from the checkpointed grain iterator, round r samples
with a key of (seed, r), and a checkpoint saved in the middle of a round stores that
round's rows in DIR/rollouts/<step>.npz, which a resumed run trains on again.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from llm.config import comma_list
from llm.data import chat, pipeline
from llm.inference.sampling import SamplingParams
from llm.objectives.base import global_batch
from llm.training import reference
from llm.training.rewards import (REQUIRED_COLUMNS, REWARD_FUNCTIONS, group_advantages,
                                  weighted_rewards)
from llm.training.samplers import SAMPLERS
from llm.workdir import Workdir


# train.grpo.old_logps -> the importance ratio's denominator: the trainer's forward pass over
# the round, or the sampler's own log-probabilities (llm.training.samplers)
OLD_LOGPS = ("trainer", "sampler")
# train.grpo.importance_sampling_correction -> TRL's vllm_importance_sampling_mode (or none)
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def uses_old_logp(g) -> bool:
  """Whether the loss's importance ratio divides by the batch's "old_logp" (else by the
  policy's own, detached, as TRL does when the round is trained on once and no sampler
  correction applies)."""
  return (g.num_iterations > 1 or g.old_logps == "sampler"
          or g.importance_sampling_correction != "none")


def importance_sampling_ratio(trainer_BT, sampler_BT, mask_BT, mode: str, clip_min: float,
                              clip_max: float) -> np.ndarray:
  """TRL's correction for a sampler that is not the trainer (its vLLM path, GRPOTrainer
  with vllm_importance_sampling_mode=`mode`): exp(trainer - sampler log-probability) per
  completion token, or exp of their sum per sequence ([B, 1]); *_truncate clips it to
  [clip_min, clip_max], *_mask sets it to 0 outside. clip_min 0 is no lower bound."""
  diff_BT = np.nan_to_num((trainer_BT - sampler_BT) * mask_BT, nan=0.0).astype(np.float64)
  if mode.startswith("sequence"):
    diff_BT = diff_BT.sum(axis=-1, keepdims=True)
  ratio = np.exp(diff_BT)
  if mode.endswith("truncate"):
    ratio = np.clip(ratio, clip_min, clip_max)
  else:
    ratio = np.where((ratio < clip_min) | (ratio > clip_max), 0.0, ratio)
  return ratio.astype(np.float32)


def _nan_stat(fn, x) -> float:
  x = np.asarray(x, np.float64)
  return float(fn(x)) if np.isfinite(x).any() else float("nan")


class Rollouts:
  """Rounds of sampled, scored completions (see the module docstring): a batch source of
  the training loop (llm.objectives.base.PackedBatches says what one offers), whose
  iterator yields train.batch_size / num_generations prompt indices per round."""

  evaluate_first = True  # the held-out reward where training starts
  frozen, frozen_shardings = (), None  # the loss reads nothing else

  def __init__(self, objective, run):
    if jax.process_count() > 1:
      raise ValueError("train.objective='grpo' runs in one process (its rollouts are generated "
                       "and scored on one host); use one process over the local devices")
    config, corpus = run.config, run.corpus
    self.run, self.config, self.g = run, config, config.train.grpo
    self.dir = run.workdir.rollouts
    self.train_prompts, self.val_prompts = corpus.train.prompts, corpus.val.prompts
    self.iterator = pipeline.train_iterator(corpus.train,
                                            config.train.batch_size // self.g.num_generations,
                                            config.data.shuffle_seed)
    self.tok = corpus.tokenizer
    self.stop = chat.stop_ids(self.tok)
    if not self.stop:
      raise ValueError("the tokenizer has no EOS or end-of-turn token to end a completion")
    self.reward_names = comma_list(self.g.rewards)
    for name in self.reward_names:  # every prompt has what its rewards read, or no work starts
      for column in REQUIRED_COLUMNS.get(name, ()):
        lacking = [p for p in [*self.train_prompts, *self.val_prompts]
                   if p.columns.get(column) is None]
        if lacking:
          raise ValueError(f"{lacking[0].where}: the prompt has no {column!r}, which the reward "
                           f"{name!r} (train.grpo.rewards) compares with ({len(lacking):,} "
                           f"prompt(s) lack it); give every prompt an {column!r} or choose "
                           "rewards that need none")
    self.scorer = None
    if self.g.reward_model:
      from llm.eval.scorer import RewardScorer
      self.scorer = RewardScorer(self.g.reward_model, mesh=run.batch_sharding.mesh)
    # what each column of _score's result is called in the logged metrics
    self.reward_labels = self.reward_names + ["reward_model"] * (self.scorer is not None)
    weights = [float(w) for w in comma_list(self.g.reward_weights)]
    self.weights = np.asarray(weights or [1.0] * len(self.reward_labels), np.float64)
    self.sampler = SAMPLERS[config.train.sampler](
        config.model, run.batch_sharding.mesh, self.stop, max_model_len=config.data.seq_len + 1,
        max_num_seqs=config.train.batch_size)
    self.sampling = SamplingParams(temperature=self.g.temperature, top_k=self.g.top_k,
                                   top_p=self.g.top_p)
    self.batch_sharding = run.batch_sharding
    self.fields = objective.batch_fields()  # the rows' arrays, name -> dtype
    self.round, self.rows, self.metrics = -1, None, {}
    self._check_rewards()

  def start(self, state, step: int) -> None:
    """Log-probabilities of the sampling policy (old_logp) and of the reference (ref_logp:
    the starting weights, kept when beta > 0 without LoRA); the round a checkpoint was
    taken in, read back."""
    del state
    run = self.run
    start_params = run.initial_params() if self.g.beta and not run.lora else None
    self.logps = reference.LiveReference(run.model, run.batch_sharding, run.param_shardings,
                                         self.config, start_params,
                                         temperature=self.g.temperature)
    self.resume(step)

  def checkpoint_problem(self, step: int) -> str | None:
    return rollouts_problem(self.run.workdir.path, self.config, step, self.fields)

  def summary(self, step: int, last: dict) -> str | None:
    del step, last
    return None

  def _check_rewards(self) -> None:
    """Runs every reward function on one prompt now, so a missing field fails before work."""
    self._score([self.train_prompts[0]], [""])

  # ----------------------------------------------------------------------------- a round

  def next(self, state, step: int) -> dict:
    """The global batch for `step` (a new round every num_iterations steps)."""
    r = step // self.g.num_iterations
    if r != self.round:
      indices = np.asarray(next(self.iterator)["index"])
      self.rows, self.metrics = self._sample(state.params, [self.train_prompts[i] for i in indices],
                                             r)
      self.round = r
    return global_batch(self.rows, self.batch_sharding, self.rows)

  def _score(self, prompts, completions: list[str]) -> np.ndarray:
    """[N, F] rewards per function (then the reward model), NaN where one returns None."""
    names = dict.fromkeys(k for p in prompts for k in p.columns)  # every field, in order
    columns = {k: [p.columns.get(k) for p in prompts] for k in names}
    convs = [p.messages for p in prompts]
    out = []
    for name in self.reward_names:
      values = REWARD_FUNCTIONS[name](prompts=convs, completions=completions, **columns)
      if len(values) != len(completions):
        raise ValueError(f"reward function {name!r} returned {len(values)} values for "
                         f"{len(completions)} completions")
      out.append([np.nan if v is None else float(v) for v in values])
    if self.scorer is not None:
      out.append(self.scorer.score([c + [{"role": "assistant", "content": x}]
                                    for c, x in zip(convs, completions)]))
    return np.asarray(out, np.float64).T

  def _generate(self, params, prompts, n: int, seed: int, sampling):
    """(Completions: ids with the stop token when one ended them, the sampler's logps;
    their texts, without the stop token), `n` per prompt in prompt order."""
    out = self.sampler.generate(params, [p.ids for p in prompts], n, self.g.max_new_tokens,
                                sampling, seed)
    texts = [self.tok.decode(c[:-1] if c and c[-1] in self.stop else c) for c in out.ids]
    return out, texts

  def _sample(self, params, prompts, r: int) -> tuple[dict, dict]:
    g, seq_len = self.g, self.config.data.seq_len
    group = [p for p in prompts for _ in range(g.num_generations)]  # TRL's repeat_interleave
    sampled, texts = self._generate(params, prompts, g.num_generations,
                                    self.config.seed * 1_000_003 + r, self.sampling)
    completions = sampled.ids
    per_function = self._score(group, texts)
    rewards = weighted_rewards(per_function, self.weights)
    advantages, std, _ = group_advantages(rewards, g.num_generations, g.scale_rewards)
    n = len(group)
    rows = {k: np.zeros((n, seq_len), dtype) for k, dtype in self.fields.items()}
    rows["is_ratio"][:] = 1.0
    sampler_logp = np.zeros((n, seq_len), np.float32)
    for i, (p, c) in enumerate(zip(group, completions)):
      ids = np.concatenate([p.ids, np.asarray(c, np.int32)])
      length = len(ids) - 1
      rows["inputs"][i, :length] = ids[:-1]
      rows["targets"][i, :length] = ids[1:]
      rows["segment_ids"][i, :length] = 1
      rows["positions"][i, :length] = np.arange(length)
      rows["loss_mask"][i, len(p.ids) - 1:length] = 1.0
      rows["advantage"][i, :length] = advantages[i]
      if sampled.logps is not None:
        sampler_logp[i, len(p.ids) - 1:length] = sampled.logps[i]
    batch = global_batch(rows, self.batch_sharding, rows)
    metrics = {}
    if g.old_logps == "sampler":
      rows["old_logp"] = sampler_logp
    elif uses_old_logp(g) or sampled.logps is not None:  # the trainer's pass over the round
      rows["old_logp"] = np.asarray(self.logps.policy_logps(params, batch))
      if sampled.logps is not None:
        metrics.update(self._parity(rows, sampler_logp))
    if g.beta:
      rows["ref_logp"] = np.asarray(self.logps.logps(params, batch))
    lengths = np.asarray([len(c) for c in completions])
    stopped = np.asarray([bool(c) and c[-1] in self.stop for c in completions])
    metrics |= {"reward": _nan_stat(np.nanmean, rewards),
               "reward_std": _nan_stat(lambda x: np.nanstd(x, ddof=1), rewards),
               "frac_reward_zero_std": float(np.mean(np.isclose(std, 0.0))),
               "completions/mean_length": float(lengths.mean()),
               "completions/min_length": float(lengths.min()),
               "completions/max_length": float(lengths.max()),
               "completions/clipped_ratio": float(1.0 - stopped.mean())}
    for j, name in enumerate(self.reward_labels):
      metrics[f"rewards/{name}/mean"] = _nan_stat(np.nanmean, per_function[:, j])
      metrics[f"rewards/{name}/std"] = _nan_stat(lambda x: np.nanstd(x, ddof=1),
                                                 per_function[:, j])
    return rows, metrics

  def _parity(self, rows: dict, sampler_logp) -> dict:
    """The round's sampler-vs-trainer metrics (TRL's names); sets rows["is_ratio"] when
    a correction is on."""
    g, mask = self.g, rows["loss_mask"] > 0
    delta = np.abs(rows["old_logp"] - sampler_logp)[mask]
    out = {"sampling/sampling_logp_difference/mean": float(delta.mean()) if delta.size else 0.0,
           "sampling/sampling_logp_difference/max": float(delta.max()) if delta.size else 0.0}
    if g.importance_sampling_correction != "none":
      ratio = importance_sampling_ratio(rows["old_logp"], sampler_logp, rows["loss_mask"],
                                        g.importance_sampling_correction,
                                        g.importance_sampling_clip_min,
                                        g.importance_sampling_clip_max)
      flat = ratio.ravel() if ratio.shape[-1] == 1 else ratio[mask]
      rows["is_ratio"][:] = np.broadcast_to(ratio, rows["is_ratio"].shape)
      for name, fn in (("min", np.min), ("mean", np.mean), ("max", np.max)):
        out[f"sampling/importance_sampling_ratio/{name}"] = float(fn(flat)) if flat.size else 0.0
    return out

  # ----------------------------------------------------------------------------- evaluation

  def evaluate(self, params) -> dict:
    """Mean rewards of greedy replies to the first train.grpo.eval_prompts held-out
    prompts: eval_reward (weighted sum) and eval_rewards/<name>/mean."""
    prompts = self.val_prompts[:self.g.eval_prompts]
    texts = self._generate(params, prompts, 1, 0, SamplingParams(temperature=0.0))[1]
    per_function = self._score(prompts, texts)
    out = {"eval_reward": _nan_stat(np.nanmean, weighted_rewards(per_function, self.weights))}
    for j, name in enumerate(self.reward_labels):
      out[f"eval_rewards/{name}/mean"] = _nan_stat(np.nanmean, per_function[:, j])
    return out

  # ----------------------------------------------------------------------------- resume

  def save(self, step: int) -> None:
    """Keeps the current round's rows for a checkpoint at `step` taken inside the round
    (a checkpoint at a round boundary needs none); the newest train.keep_checkpoints
    files are kept."""
    keep = self.config.train.keep_checkpoints
    if step % self.g.num_iterations == 0 or self.rows is None:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    tmp = self.dir / f"{step}.{os.getpid()}.tmp.npz"
    np.savez(tmp, round=self.round, **self.rows,
             **{f"metric:{k}": v for k, v in self.metrics.items()})
    os.replace(tmp, self.dir / f"{step}.npz")
    saved = sorted((int(p.stem) for p in self.dir.glob("*.npz") if p.stem.isdigit()),
                   reverse=True)
    for old in saved[keep:]:
      (self.dir / f"{old}.npz").unlink(missing_ok=True)

  def resume(self, step: int) -> None:
    """Reads the rows of the round a checkpoint at `step` was taken in, if it was inside one."""
    if step % self.g.num_iterations == 0:
      return
    # (verified with its checkpoint: rollouts_problem is the checkpointer's check_extra)
    with np.load(self.dir / f"{step}.npz") as z:
      self.round = int(z["round"])
      self.rows = {k: z[k] for k in self.fields}
      self.metrics = {k[len("metric:"):]: float(z[k]) for k in z.files if k.startswith("metric:")}


def rollouts_problem(workdir, config, step: int, fields) -> str | None:
  """What is wrong with the rollouts a checkpoint at `step` needs (None: nothing, or it
  needs none): missing, or damaged (each array is read, so the zip's CRC32s are
  checked), or without one of `fields` (the objective's batch fields)."""
  g = config.train.grpo
  if step % g.num_iterations == 0:
    return None
  path = Workdir(workdir).rollouts / f"{step}.npz"
  if not path.is_file():
    return (f"it was taken inside a GRPO round (train.grpo.num_iterations={g.num_iterations}) "
            f"but that round's rollouts {path} are missing")
  try:
    with np.load(path) as z:
      missing = [k for k in ("round", *fields) if k not in z.files]
      for k in z.files:
        z[k]  # noqa: B018 (reading verifies the CRC32)
  except Exception as e:  # noqa: BLE001 (zipfile, zlib and numpy each raise their own)
    return f"its GRPO rollouts {path} are damaged ({type(e).__name__}: {str(e)[:200]})"
  if missing:
    return f"its GRPO rollouts {path} lack {missing}"
  return None
