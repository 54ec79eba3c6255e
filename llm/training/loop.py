"""The training loop: mesh, data, state (fresh or restored), the jitted step, periodic
evaluation, logging and checkpoints; SIGTERM (one process or all) checkpoints and stops.

`train(config, workdir)` re-run on the same workdir resumes from its latest checkpoint
and continues exactly as an uninterrupted run would. The CLI is `python -m llm.train`.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llm import config as config_lib
from llm import flops
from llm import hardware
from llm.data import pipeline
from llm.model import lora, make_model
from llm.parallel import rules
from llm.parallel.mesh import make_mesh, use_mesh
from llm.training import checkpoint as checkpoint_lib
from llm.training import grpo, reference
from llm.training.metrics import MetricsWriter
from llm.training.objectives import NEEDS_REFERENCE
from llm.training.optim import make_optimizer
from llm.training.preemption import StopDecision
from llm.training.state import init_state, state_shardings
from llm.training.step import (BATCH_KEYS, abstract_batch, batch_fields, check_batch,
                               jit_train_step, make_objective)
from llm.workdir import Workdir, lora_base, restore_params


def global_batch(local: dict, batch_sharding, keys=BATCH_KEYS) -> dict:
  """Assembles each process's rows into global arrays laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
          for k in keys}


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row (train.max_consecutive_skips)."""


def _prepare_data(config, workdir):
  """Tokenizer and token cache are written by process 0 first; the others then read them
  (the workdir is shared storage in multi-host runs, as checkpoints need)."""
  if jax.process_count() == 1:
    return pipeline.prepare(config, workdir)
  if jax.process_index() == 0:
    corpus = pipeline.prepare(config, workdir)
  multihost_utils.sync_global_devices("llm.train: data prepared")
  if jax.process_index() != 0:
    corpus = pipeline.prepare(config, workdir)
  return corpus


def _start_state(config, wd: Workdir, ckpt, model, tx, mesh, train_iter, facts: dict):
  """(state, train_iter, state shardings): the newest good checkpoint's, else a fresh
  state (from train.init_params when set). With LoRA the checkpoints hold the adapters
  (and their optimizer state) only: the base comes from train.init_params (or the seeded
  initialisation) every time."""
  primary = jax.process_index() == 0
  abstract_state, shardings = state_shardings(model, tx, config.data.seq_len, mesh)
  use_lora = bool(config.model.lora.rank)
  state = None
  if use_lora:  # the frozen base is needed whether or not a checkpoint resumes
    state = _fresh_state(config, model, tx, shardings, abstract_state)
  check_extra = None
  if config.train.objective == "grpo":  # a checkpoint inside a round needs its rollouts
    check_extra = lambda step: grpo.rollouts_problem(wd.path, config, step)  # noqa: E731
  resumed = ckpt.restore_newest_good(
      saved_part(config, abstract_state), train_iter,
      lambda saved: checkpoint_lib.check_resumable(saved, config, wd.path, facts), check_extra)
  if resumed is not None:
    step, saved, train_iter = resumed
    if use_lora:
      saved = saved.replace(params=lora.join(lora.split(state.params)[0], saved.params))
    if primary:
      print(f"resumed from step {step} in {ckpt.directory}", flush=True)
    return saved, train_iter, shardings
  if state is None:
    state = _fresh_state(config, model, tx, shardings, abstract_state)
  if config.model.lora.rank and primary:
    print(f"LoRA: training {lora.adapter_bytes(state.params) / 2**20:.2f} MiB of adapters "
          f"(rank {config.model.lora.rank} on {config.model.lora.targets}); the base is "
          "frozen and checkpoints hold the adapters only", flush=True)
  return state, train_iter, shardings


def _fresh_state(config, model, tx, shardings, abstract_state):
  state = init_state(model, tx, config.data.seq_len, config.seed, shardings)
  if config.model.lora.rank:  # the frozen base: init_params (quantized for QLoRA) or as is
    base_target, _ = lora.split(abstract_state.params)
    _, adapters = lora.split(state.params)
    if config.train.init_params or config.model.lora.base_quant != "none":
      state = state.replace(params=lora.join(lora_base(config, base_target), adapters))
  elif config.train.init_params:
    target = dict(abstract_state.params)
    fresh_head = {"score": state.params["score"]} if "score" in target else {}
    target.pop("score", None)  # a reward model: the backbone from init_params, a new head
    state = state.replace(params={**restore_params(config.train.init_params, target,
                                                   partial=bool(fresh_head),
                                                   model_cfg=config.model),
                                  **fresh_head})
  if config.train.init_params and jax.process_index() == 0:
    print(f"initialised params from {config.train.init_params}", flush=True)
  return state


def saved_part(config, state):
  """What a checkpoint holds of the train state: all of it, or with LoRA the state with
  the adapters as its params (the frozen base is not saved again and again)."""
  if not config.model.lora.rank:
    return state
  return state.replace(params=lora.split(state.params)[1])


def train(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) per `config` in `workdir`; returns the last logged metrics
  (floats).

  `devices` (default: all) are the devices the mesh is laid over. Raises ValueError for
  bad settings (before any work), RuntimeError if another run holds the workdir, and
  TrainingDiverged after train.max_consecutive_skips non-finite steps in a row.
  """
  config_lib.validate(config)
  if config.data.curate.stages and not config.data.store:
    raise ValueError(f"data.curate.stages={config.data.curate.stages!r} curates a token store "
                     "as llm.data.prepare builds it; training from data.source does not curate. "
                     "Build a store (python -m llm.data.prepare) and set data.store, or leave "
                     "data.curate.stages empty")
  stop = StopDecision()  # from here on SIGTERM is a clean stop, start-up included
  wd = Workdir(workdir)
  mesh = make_mesh(config.mesh, devices)
  check_batch(config, mesh)
  # Process 0 holds the workdir for the job (the others share it).
  lock = wd.lock() if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, use_mesh(mesh), contextlib.ExitStack() as cleanup:
    last = _train(config, wd, mesh, stop, cleanup)
  return {k: float(v) if np.ndim(v) == 0 else v for k, v in last.items()}


def _train(config, wd: Workdir, mesh, stop: StopDecision, cleanup: contextlib.ExitStack) -> dict:
  """The run; `cleanup` closes the checkpointer and metrics writer however it ends."""
  primary = jax.process_index() == 0
  corpus = _prepare_data(config, wd.path)
  model = make_model(config.model)
  total_steps = config.train.steps
  tx = make_optimizer(config.optim, total_steps)
  batch_sharding = rules.batch_sharding(mesh)
  live_reference = (config.train.objective in NEEDS_REFERENCE and
                    config.train.dpo.reference == "live")
  if config.train.objective in NEEDS_REFERENCE and not live_reference:  # before any row is read
    abstract_state, shardings = state_shardings(model, tx, config.data.seq_len, mesh)
    reference.attach(config, wd.data, corpus, model,
                     lambda: _fresh_state(config, model, tx, shardings, abstract_state).params,
                     mesh, batch_sharding, shardings.params)
  # what the rows hold (a live reference adds ref_logp to each batch)
  keys = tuple(k for k in batch_fields(config) if not (live_reference and k == "ref_logp"))
  grpo_run = config.train.objective == "grpo"  # batches are sampled rounds (llm.training.grpo)
  rows_per_batch = (config.train.batch_size // config.train.grpo.num_generations if grpo_run
                    else config.train.batch_size)  # GRPO: prompts per round
  train_iter = pipeline.train_iterator(corpus.train, rows_per_batch,
                                       config.data.shuffle_seed, jax.process_index(),
                                       jax.process_count())
  ckpt = checkpoint_lib.Checkpointer(wd.checkpoints, config.train.keep_checkpoints,
                                     config.train.async_checkpointing)
  cleanup.callback(ckpt.close)
  facts = checkpoint_lib.run_facts(corpus)
  state, train_iter, shardings = _start_state(config, wd, ckpt, model, tx, mesh, train_iter,
                                              facts)
  step = int(jax.device_get(state.step))
  if step >= total_steps:  # a finished run: no compile, no work
    if primary:
      print(f"the run in {wd.path} is complete: its checkpoint is at step {step} of "
            f"train.steps={total_steps}; nothing to do (raise --config.train.steps to train "
            "further)", flush=True)
    return _last_logged(wd)
  start_params = None  # the starting weights, kept where a live reference needs them
  if ((live_reference or (grpo_run and config.train.grpo.beta))
      and not config.model.lora.rank):  # (a LoRA run's reference is its base)
    abstract_state, _ = state_shardings(model, tx, config.data.seq_len, mesh)
    start_params = _fresh_state(config, model, tx, shardings, abstract_state).params
  live = (reference.LiveReference(model, batch_sharding, shardings.params, config, start_params)
          if live_reference else None)
  rollouts = None
  if grpo_run:
    rollouts = grpo.Rollouts(config, wd.path, corpus, model, batch_sharding, shardings.params,
                             start_params)
    rollouts.resume(step)
  if primary:  # only once the run has really started or resumed
    wd.write_config(config)

  t0 = time.perf_counter()
  step_fn = jit_train_step(config, model, tx, shardings, batch_sharding).lower(
      state, abstract_batch(config, batch_sharding)).compile()
  compile_seconds = time.perf_counter() - t0
  def next_batch(step: int) -> dict:
    if rollouts is not None:
      return rollouts.batch(state, step, train_iter)
    batch = global_batch(next(train_iter), batch_sharding, keys)
    return batch if live is None else live.attach(batch, state.params)

  eval_fn = jax.jit(make_objective(config, model),
                    in_shardings=(shardings.params, batch_sharding))
  val_batches = [] if grpo_run else [global_batch(b, batch_sharding, keys) for b in
                                      pipeline.eval_batches(corpus.val, config.train.batch_size,
                                                            config.train.eval_batches,
                                                            jax.process_index(),
                                                            jax.process_count())]
  if live is not None:  # the reference does not move: once for the fixed validation batches
    val_batches = [live.attach(b, state.params) for b in val_batches]

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = flops.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
  peak, peak_source = hardware.peak_flops(config.train.peak_flops_per_device,
                                          jnp.dtype(config.model.dtype))
  writer = MetricsWriter(wd.path, total_steps, enabled=primary, train_cfg=config.train,
                         config_dict=config.to_dict(), first_step=step)
  cleanup.callback(writer.close)
  if primary:
    print(f"model: {n_params:,} params | {config.train.batch_size} x {config.data.seq_len} "
          f"tokens/step | mesh {dict(mesh.shape)} | compile {compile_seconds:.1f}s | "
          f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})", flush=True)
    baseline = (f" | unigram baseline val loss {corpus.unigram_loss:.4f}"
                if np.isfinite(corpus.unigram_loss) else "")
    print(f"data: {len(corpus.train):,} train rows, {len(corpus.val):,} val rows{baseline}",
          flush=True)

  def evaluate(params) -> dict:
    """The objective's metrics over the validation batches: eval_loss (cross-entropy per
    token for next-token objectives) and the others by name; for GRPO the rewards of
    greedy replies to held-out prompts."""
    if rollouts is not None:
      return rollouts.evaluate(params)
    sums = [jax.device_get(eval_fn(params, b)[1]) for b in val_batches]
    totals = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
    weight = max(totals.pop("weight"), 1.0)
    out = {f"eval_{k}": v / weight for k, v in totals.items()}
    if np.isfinite(corpus.unigram_loss):  # next-token objectives
      out["eval_perplexity"] = float(np.exp(min(out["eval_loss"], 50.0)))
      out["unigram_loss"] = corpus.unigram_loss
    return out

  first_step = step
  last: dict = {}
  # a signal during start-up: stop before the first step (the multi-process decision is
  # taken at step boundaries only)
  stopped_early = step < total_steps and not stop.multiprocess and stop.stop_at(step)
  skips_in_a_row = 0
  if rollouts is not None and step == 0 and not stopped_early:  # where the rewards start
    start = evaluate(state.params)
    writer.write(0, start)
    if primary:
      print(f"step 0: held-out reward {start['eval_reward']:.4f}", flush=True)
  t_last, step_last = time.perf_counter(), step
  while step < total_steps and not stopped_early:
    state, metrics = step_fn(state, next_batch(step))
    step += 1
    skips_in_a_row = 0 if int(metrics["step_finite"]) else skips_in_a_row + 1
    if skips_in_a_row >= config.train.max_consecutive_skips:
      writer.write(step, jax.device_get(metrics))
      ckpt.wait()
      raise TrainingDiverged(_diverged_message(config, step, skips_in_a_row, metrics,
                                               ckpt.latest_step()))
    stopped_early = step < total_steps and stop.stop_at(step)  # read once: a signal
    # landing later in this iteration is acted on after the next step, never between
    # log and save
    done = step == total_steps or stopped_early
    if step % config.train.log_every == 0 or done:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      seconds_per_step = (now - t_last) / max(step - step_last, 1)
      t_last, step_last = now, step
      metrics["tokens_per_sec"] = tokens_per_step / seconds_per_step
      metrics["mfu"] = flops_per_step / seconds_per_step / peak
      if rollouts is not None:  # the round's rewards and completion lengths
        metrics.update(rollouts.metrics)
      if step % config.train.eval_every == 0 or done:
        metrics.update(evaluate(state.params))
        t_last = time.perf_counter()  # evaluation time is not training time
      writer.write(step, metrics, seconds_per_step)
      last = metrics
    elif step % config.train.eval_every == 0:
      last = evaluate(state.params)
      writer.write(step, last)
    # A streak of skipped steps changes nothing worth a periodic checkpoint, and saving one
    # would push an older (pre-streak) checkpoint out of the keep-N window.
    if (step % config.train.checkpoint_every == 0 and not skips_in_a_row) or done:
      if rollouts is not None:
        rollouts.save(step, config.train.keep_checkpoints)
      ckpt.save(step, saved_part(config, state), train_iter,
                checkpoint_lib.saved_item(config, facts))
  ckpt.wait()
  if primary and stopped_early:
    where = (f"at step {step} of {total_steps}; checkpoint saved in {ckpt.directory}"
             if step > first_step else f"during start-up, before step {step + 1}; nothing new "
             "to save")
    print(f"stopped early (signal) {where}. Re-run the same command to resume.", flush=True)
  elif primary and "eval_loss" in last and np.isfinite(corpus.unigram_loss):
    verdict = "below" if last["eval_loss"] < corpus.unigram_loss else "NOT below"
    n_val = len(val_batches) * config.train.batch_size
    print(f"done at step {step}: eval loss {last['eval_loss']:.4f} (the first {n_val:,} of "
          f"{len(corpus.val):,} validation rows) is {verdict} the unigram baseline "
          f"{corpus.unigram_loss:.4f}", flush=True)
  return last


def _last_logged(wd: Workdir) -> dict:
  """The last record of the run's metrics.jsonl (without its step), {} when none."""
  if not wd.metrics.is_file():
    return {}
  lines = [line for line in wd.metrics.read_text().splitlines() if line.strip()]
  try:
    record = json.loads(lines[-1]) if lines else {}
  except ValueError:
    return {}
  return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def _diverged_message(config, step: int, skips: int, metrics, good_checkpoint) -> str:
  m = jax.device_get(metrics)
  resume = (f"The newest checkpoint (step {good_checkpoint}) holds finite params: resume from "
            f"it with a lower --config.optim.lr (now {config.optim.lr:g})"
            if good_checkpoint is not None else
            f"No checkpoint was written; start again with a lower --config.optim.lr (now "
            f"{config.optim.lr:g})")
  return (f"training stopped at step {step}: the last {skips} steps (train.max_consecutive_skips"
          f"={config.train.max_consecutive_skips}) had a non-finite loss, gradient or update "
          f"(loss {float(m['objective']):.4g}, grad norm {float(m['grad_norm']):.4g}) and were "
          f"skipped, so the params are those after step {step - skips}. {resume}, or check the "
          f"data of steps {step - skips + 1}..{step}.")
