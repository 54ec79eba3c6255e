"""The training loop: mesh, data, state (fresh or restored), the jitted step, periodic
evaluation, logging and checkpoints; SIGTERM (one process or all) checkpoints and stops.

`train(config, workdir)` re-run on the same workdir resumes from its latest checkpoint
and continues exactly as an uninterrupted run would. The CLI is `python -m llm.train`.
"""

from __future__ import annotations

import functools
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from llm import config as config_lib
from llm import flops
from llm import hardware
from llm.data import pipeline
from llm.eval.heldout import nll_sums
from llm.model import make_model
from llm.parallel import rules
from llm.parallel.mesh import make_mesh, use_mesh
from llm.training import checkpoint as checkpoint_lib
from llm.training.metrics import MetricsWriter
from llm.training.optim import make_optimizer
from llm.training.state import init_state, state_shardings
from llm.training.step import BATCH_KEYS, abstract_batch, check_batch, jit_train_step
from llm.workdir import Workdir, restore_params


def global_batch(local: dict, batch_sharding) -> dict:
  """Assembles each process's rows into global arrays laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
          for k in BATCH_KEYS}


class _Preemption:
  """Turns SIGTERM into a stop decision the loop reads once per step.

  With several processes, JAX's preemption sync service (started by
  jax.distributed.initialize) spreads a notice to all of them and names one step at
  which every process stops and checkpoints together."""

  def __init__(self):
    self.requested = False
    self.multiprocess = jax.process_count() > 1
    if self.multiprocess:
      return
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a notebook worker)
      pass

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.requested = True

  def stop_at(self, step: int) -> bool:
    if self.multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


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


def _start_state(config, ckpt, model, tx, mesh, train_iter):
  """(state, train_iter, state shardings): the latest checkpoint's, else a fresh state
  (from train.init_params when set)."""
  primary = jax.process_index() == 0
  abstract_state, shardings = state_shardings(model, tx, config.data.seq_len, mesh)
  latest = ckpt.latest_step()
  if latest is not None:
    state, train_iter = ckpt.restore(latest, abstract_state, train_iter)
    if primary:
      print(f"resumed from step {latest} in {ckpt.directory}", flush=True)
    return state, train_iter, shardings
  state = init_state(model, tx, config.data.seq_len, config.seed, shardings)
  if config.train.init_params:
    state = state.replace(params=restore_params(config.train.init_params, abstract_state.params))
    if primary:
      print(f"initialised params from {config.train.init_params}", flush=True)
  return state, train_iter, shardings


def train(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) per `config` in `workdir`; returns the last logged metrics.

  `devices` (default: all) are the devices the mesh is laid over.
  """
  config_lib.validate(config)
  wd = Workdir(workdir)
  wd.path.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(config.mesh, devices)
  check_batch(config, mesh)
  with use_mesh(mesh):
    return _train(config, wd, mesh)


def _train(config, wd: Workdir, mesh) -> dict:
  primary = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpointer(wd.checkpoints, config.train.keep_checkpoints,
                                     config.train.async_checkpointing)
  latest = ckpt.latest_step()
  if latest is not None:
    checkpoint_lib.check_same_model(ckpt.saved_config(latest), config.model, wd.path)

  corpus = _prepare_data(config, wd.path)
  model = make_model(config.model)
  total_steps = config.train.steps
  tx = make_optimizer(config.optim, total_steps)
  train_iter = pipeline.train_iterator(corpus.train, config.train.batch_size,
                                       config.data.shuffle_seed, jax.process_index(),
                                       jax.process_count())
  state, train_iter, shardings = _start_state(config, ckpt, model, tx, mesh, train_iter)
  if primary:  # only once the run has really started or resumed
    wd.write_config(config)

  batch_sharding = rules.batch_sharding(mesh)
  t0 = time.perf_counter()
  step_fn = jit_train_step(config, model, tx, shardings, batch_sharding).lower(
      state, abstract_batch(config, batch_sharding)).compile()
  compile_seconds = time.perf_counter() - t0
  eval_fn = jax.jit(functools.partial(nll_sums, model),
                    in_shardings=(shardings.params, batch_sharding))
  val_batches = [global_batch(b, batch_sharding) for b in pipeline.eval_batches(
      corpus.val, config.train.batch_size, config.train.eval_batches, jax.process_index(),
      jax.process_count())]

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = flops.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
  peak, peak_source = hardware.peak_flops(config.train.peak_flops_per_device,
                                          jnp.dtype(config.model.dtype))
  writer = MetricsWriter(wd.path, total_steps, enabled=primary)
  if primary:
    print(f"model: {n_params:,} params | {config.train.batch_size} x {config.data.seq_len} "
          f"tokens/step | mesh {dict(mesh.shape)} | compile {compile_seconds:.1f}s | "
          f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})", flush=True)
    print(f"data: {len(corpus.train):,} train rows, {len(corpus.val):,} val rows | unigram "
          f"baseline val loss {corpus.unigram_loss:.4f}", flush=True)

  def evaluate(params) -> dict:
    sums = [eval_fn(params, b) for b in val_batches]
    nll = sum(float(s[0]) for s in sums)
    tokens = sum(float(s[1]) for s in sums)
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "unigram_loss": corpus.unigram_loss}

  preemption = _Preemption()
  step = int(jax.device_get(state.step))
  last: dict = {}
  stopped_early = False
  t_last, step_last = time.perf_counter(), step
  while step < total_steps:
    state, metrics = step_fn(state, global_batch(next(train_iter), batch_sharding))
    step += 1
    stopped_early = step < total_steps and preemption.stop_at(step)  # read once: a signal
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
      if step % config.train.eval_every == 0 or done:
        metrics.update(evaluate(state.params))
        t_last = time.perf_counter()  # evaluation time is not training time
      writer.write(step, metrics, seconds_per_step)
      last = metrics
    elif step % config.train.eval_every == 0:
      last = evaluate(state.params)
      writer.write(step, last)
    if step % config.train.checkpoint_every == 0 or done:
      ckpt.save(step, state, train_iter, config.to_dict())
    if done:
      break
  ckpt.wait()
  ckpt.close()
  writer.close()
  if primary and stopped_early:
    print(f"stopped early at step {step} of {total_steps} (signal); checkpoint saved in "
          f"{ckpt.directory}. Re-run the same command to resume.", flush=True)
  elif primary and "eval_loss" in last:
    verdict = "below" if last["eval_loss"] < corpus.unigram_loss else "NOT below"
    print(f"done at step {step}: eval loss {last['eval_loss']:.4f} is {verdict} the unigram "
          f"baseline {corpus.unigram_loss:.4f}", flush=True)
  return last
