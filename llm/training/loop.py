"""The training loop: mesh, data, state (fresh or restored), the jitted step, periodic
evaluation, logging and checkpoints; SIGTERM (one process or all) checkpoints and stops.

What is minimised, what the data are, where batches come from and how a run is evaluated
are the objective's (llm.objectives): the loop names none.

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
from llm import objectives
from llm.model import lora, make_model, quant
from llm.objectives.base import Run
from llm.parallel import pipeline, rules
from llm.parallel.mesh import make_mesh, use_mesh
from llm.training import checkpoint as checkpoint_lib
from llm.training.metrics import MetricsWriter
from llm.training.optim import make_optimizer
from llm.training.preemption import StopDecision
from llm.training.state import init_state, state_shardings
from llm.training.step import check_batch, jit_train_step
from llm.workdir import Workdir, lora_base, restore_params


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row (train.max_consecutive_skips)."""


def _prepare_data(config, workdir, reader):
  """Tokenizer and token cache are written by process 0 first; the others then read them
  (the workdir is shared storage in multi-host runs, as checkpoints need)."""
  if jax.process_count() == 1:
    return reader.prepare(config, workdir)
  if jax.process_index() == 0:
    corpus = reader.prepare(config, workdir)
  multihost_utils.sync_global_devices("llm.train: data prepared")
  if jax.process_index() != 0:
    corpus = reader.prepare(config, workdir)
  return corpus


def _start_state(config, ckpt, wd: Workdir, source, abstract_state, fresh_state, facts: dict):
  """The newest good checkpoint's state (and the source's iterator, restored in place),
  else a fresh state (from train.init_params when set). With LoRA the checkpoints hold
  the adapters (and their optimizer state) only: the base comes from train.init_params
  (or the seeded initialisation) every time."""
  primary = jax.process_index() == 0
  use_lora = bool(config.model.lora.rank)
  # the frozen base is needed whether or not a checkpoint resumes
  state = fresh_state() if use_lora else None
  resumed = ckpt.restore_newest_good(
      saved_part(config, abstract_state), source.iterator,
      lambda saved: checkpoint_lib.check_resumable(saved, config, wd.path, facts),
      source.checkpoint_problem)
  if resumed is not None:
    step, saved, source.iterator = resumed
    if use_lora:
      saved = saved.replace(params=lora.join(lora.split(state.params)[0], saved.params))
    if primary:
      print(f"resumed from step {step} in {ckpt.directory}", flush=True)
    return saved
  if state is None:
    state = fresh_state()
  if config.model.lora.rank and primary:
    print(f"LoRA: training {lora.adapter_bytes(state.params) / 2**20:.2f} MiB of adapters "
          f"(rank {config.model.lora.rank} on {config.model.lora.targets}); the base is "
          "frozen and checkpoints hold the adapters only", flush=True)
  return state


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
  if config.model.weight_quant != "none":
    raise ValueError(f"model.weight_quant={config.model.weight_quant!r} is a served model's "
                     "quantized kernels (python -m llm.quantize), which do not train: train the "
                     "float workdir, or a LoRA on it with model.lora.base_quant (QLoRA)")
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
  objective = objectives.get(config)
  corpus = _prepare_data(config, wd.path, objective.data)
  model = quant.for_training(make_model(config.model, config.train.pipeline_microbatches),
                             config.train.quantization)
  tx = make_optimizer(config.optim, config.train.steps)
  abstract_state, shardings = state_shardings(model, tx, config.data.seq_len, mesh)
  batch_sharding = rules.batch_sharding(mesh)
  fresh = lambda: _fresh_state(config, model, tx, shardings, abstract_state)  # noqa: E731
  run = Run(config, wd, corpus, model, batch_sharding, shardings.params,
            objectives.loss_fn(config, model), lambda: fresh().params)
  source = objective.batches(objective, run)  # before any row is read
  ckpt = checkpoint_lib.Checkpointer(wd.checkpoints, config.train.keep_checkpoints,
                                     config.train.async_checkpointing)
  cleanup.callback(ckpt.close)
  facts = checkpoint_lib.run_facts(corpus)
  state = _start_state(config, ckpt, wd, source, abstract_state, fresh, facts)
  step = int(jax.device_get(state.step))
  if step >= config.train.steps:  # a finished run: no compile, no work
    if jax.process_index() == 0:
      print(f"the run in {wd.path} is complete: its checkpoint is at step {step} of "
            f"train.steps={config.train.steps}; nothing to do (raise --config.train.steps to "
            "train further)", flush=True)
    return _last_logged(wd)
  source.start(state, step)
  if jax.process_index() == 0:  # only once the run has really started or resumed
    wd.write_config(config)
  t0 = time.perf_counter()
  step_fn = jit_train_step(config, run.loss, tx, shardings, batch_sharding,
                           source.frozen_shardings if source.frozen else None).lower(
      state, objective.abstract_batch(config, batch_sharding), *source.frozen).compile()
  compile_seconds = time.perf_counter() - t0
  writer = MetricsWriter(wd.path, config.train.steps, enabled=jax.process_index() == 0,
                         train_cfg=config.train, config_dict=config.to_dict(), first_step=step)
  cleanup.callback(writer.close)
  rates = _announce(config, state, corpus, mesh, compile_seconds)
  return _run_steps(config, state, step, step_fn, source, ckpt, writer, stop, rates, facts)


def _announce(config, state, corpus, mesh, compile_seconds: float) -> tuple[float, float]:
  """Prints the run's model and data lines; (tokens, model FLOPs) per step and the peak
  FLOP/s, for the logged throughput and MFU."""
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = flops.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
  peak, peak_source = hardware.peak_flops(config.train.peak_flops_per_device,
                                          jnp.dtype(config.model.dtype))
  if jax.process_index() == 0:
    print(f"model: {n_params:,} params | {config.train.batch_size} x {config.data.seq_len} "
          f"tokens/step | mesh {dict(mesh.shape)} | compile {compile_seconds:.1f}s | "
          f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})", flush=True)
    n_stages = pipeline.stages(mesh)
    if n_stages > 1:
      micro = pipeline.microbatch_count(config.train.pipeline_microbatches, n_stages)
      repeats = config.model.pipeline_repeats
      print(f"pipeline: {n_stages} stages x {repeats} repeats, {micro} microbatches | bubble "
            f"{pipeline.bubble_fraction(n_stages, repeats, micro):.1%} "
            "= (P - 1) / (repeats x microbatches + P - 1)", flush=True)
    baseline = (f" | unigram baseline val loss {corpus.unigram_loss:.4f}"
                if np.isfinite(corpus.unigram_loss) else "")
    print(f"data: {len(corpus.train):,} train rows, {len(corpus.val):,} val rows{baseline}",
          flush=True)
  return tokens_per_step, flops_per_step / peak


def _run_steps(config, state, step, step_fn, source, ckpt, writer, stop, rates, facts) -> dict:
  """Steps from `step` to train.steps (or a stop signal), logging, evaluating and
  checkpointing on their schedules; the last logged metrics."""
  primary, total_steps, t = jax.process_index() == 0, config.train.steps, config.train
  tokens_per_step, peak_seconds_per_step = rates
  first_step, last = step, {}
  # a signal during start-up: stop before the first step (the multi-process decision is
  # taken at step boundaries only)
  stopped_early = not stop.multiprocess and stop.stop_at(step)
  skips_in_a_row = 0
  if source.evaluate_first and step == 0 and not stopped_early:  # where training starts
    start = source.evaluate(state.params)
    writer.write(0, start)
    if primary:
      print("step 0 (before training): " + ", ".join(f"{k} {v:.4f}" for k, v in start.items()),
            flush=True)
  t_last, step_last = time.perf_counter(), step
  while step < total_steps and not stopped_early:
    state, metrics = step_fn(state, source.next(state, step), *source.frozen)
    step += 1
    skips_in_a_row = 0 if int(metrics["step_finite"]) else skips_in_a_row + 1
    if skips_in_a_row >= t.max_consecutive_skips:
      writer.write(step, jax.device_get(metrics))
      ckpt.wait()
      raise TrainingDiverged(_diverged_message(config, step, skips_in_a_row, metrics,
                                               ckpt.latest_step()))
    stopped_early = step < total_steps and stop.stop_at(step)  # read once: a signal
    # landing later in this iteration is acted on after the next step, never between
    # log and save
    done = step == total_steps or stopped_early
    if step % t.log_every == 0 or done:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      seconds_per_step = (now - t_last) / max(step - step_last, 1)
      t_last, step_last = now, step
      metrics["tokens_per_sec"] = tokens_per_step / seconds_per_step
      metrics["mfu"] = peak_seconds_per_step / seconds_per_step
      metrics.update(source.metrics)  # e.g. a sampled round's rewards
      if step % t.eval_every == 0 or done:
        metrics.update(source.evaluate(state.params))
        t_last = time.perf_counter()  # evaluation time is not training time
      writer.write(step, metrics, seconds_per_step)
      last = metrics
    elif step % t.eval_every == 0:
      last = source.evaluate(state.params)
      writer.write(step, last)
    # A streak of skipped steps changes nothing worth a periodic checkpoint, and saving one
    # would push an older (pre-streak) checkpoint out of the keep-N window.
    if (step % t.checkpoint_every == 0 and not skips_in_a_row) or done:
      source.save(step)
      ckpt.save(step, saved_part(config, state), source.iterator,
                checkpoint_lib.saved_item(config, facts))
  ckpt.wait()
  if primary and stopped_early:
    where = (f"at step {step} of {total_steps}; checkpoint saved in {ckpt.directory}"
             if step > first_step else f"during start-up, before step {step + 1}; nothing new "
             "to save")
    print(f"stopped early (signal) {where}. Re-run the same command to resume.", flush=True)
  elif primary and (summary := source.summary(step, last)):
    print(summary, flush=True)
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
