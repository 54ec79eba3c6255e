"""Training: a pure, jitted `train_step(state, batch) -> (state, metrics)` and the loop around it.

  python -m llm.train --config=configs/tiny.py --workdir=DIR [--config.train.steps=200 ...]

Re-running the same command resumes from the latest checkpoint in DIR.
SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from llm import checkpoint as checkpoint_lib
from llm import config as config_lib
from llm import distributed
from llm import metrics as metrics_lib
from llm import sharding
from llm.data import pipeline
from llm.model import make_model
from llm.optim import make_optimizer, schedule
from llm.state import TrainState, init_state, state_shardings

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# ----------------------------------------------------------------------------- the step

def loss_terms(params, batch, *, model, z_loss: float):
  """(objective summed over tokens, (nll sum, z sum, token count)) for one microbatch."""
  logits_BTV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["positions"])
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
  mask_BT = batch["loss_mask"]
  nll = jnp.sum((logz_BT - target_logit_BT) * mask_BT)
  z = jnp.sum(jnp.square(logz_BT) * mask_BT)
  return nll + z_loss * z, (nll, z, jnp.sum(mask_BT))


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch i taking rows i, i+n, ... (spread over devices)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch, *, model, tx, lr_schedule, z_loss: float,
               grad_accum: int):
  grad_fn = jax.grad(functools.partial(loss_terms, model=model, z_loss=z_loss), has_aux=True)
  if grad_accum == 1:
    grads, (nll, z, tokens) = grad_fn(state.params, batch)
  else:
    def accumulate(carry, microbatch):
      g, (nll, z, tokens) = grad_fn(state.params, microbatch)
      return jax.tree.map(jnp.add, carry, (g, (nll, z, tokens))), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), (0.0, 0.0, 0.0))
    (grads, (nll, z, tokens)), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, grad_accum))
  tokens = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  loss, grad_norm = nll / tokens, optax.tree.norm(grads)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = {"loss": loss, "z_loss": z / tokens, "grad_norm": grad_norm,
             "learning_rate": lr_schedule(state.step), "tokens": tokens,
             "skipped_steps": new_state.skipped}
  return new_state, metrics


def eval_step(params, batch, *, model):
  _, (nll, _, tokens) = loss_terms(params, batch, model=model, z_loss=0.0)
  return nll, tokens


# ----------------------------------------------------------------------------- the loop

def abstract_batch(config, batch_sharding) -> dict:
  """Shapes, dtypes and sharding of one global batch, for compiling ahead of time."""
  return {k: jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len),
                                  jnp.float32 if k == "loss_mask" else jnp.int32,
                                  sharding=batch_sharding) for k in BATCH_KEYS}


def jit_train_step(config, model, tx, shardings, batch_sharding):
  """The train step for `config`, jitted with the state's and batch's shardings (the
  state is donated): what the loop runs and what llm.plan compiles for a topology."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx,
                        lr_schedule=schedule(config.optim, config.train.steps),
                        z_loss=config.train.z_loss, grad_accum=config.train.grad_accum),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
      donate_argnums=0)


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


def check_batch(config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  b, accum = config.train.batch_size, config.train.grad_accum
  if b % (dp * accum):
    raise ValueError(f"train.batch_size={b} must be divisible by the data-parallel size "
                     f"(mesh data x fsdp = {dp}) times train.grad_accum={accum}")
  if config.data.seq_len % mesh.shape["sequence"]:
    raise ValueError(f"data.seq_len={config.data.seq_len} must be divisible by "
                     f"mesh.sequence={mesh.shape['sequence']}")


def train(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) per `config` in `workdir`; returns the last logged metrics.

  `devices` (default: all) are the devices the mesh is laid over.
  """
  config_lib.validate(config)
  workdir_path = Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch(config, mesh)
  primary = jax.process_index() == 0

  ckpt = checkpoint_lib.Checkpointer(workdir_path / "checkpoints", config.train.keep_checkpoints,
                                     config.train.async_checkpointing)
  latest = ckpt.latest_step()
  if latest is not None:
    checkpoint_lib.check_same_model(ckpt.saved_config(latest), config.model, workdir)
  if primary:
    (workdir_path / "config.json").write_text(config_lib.to_json(config))

  corpus = _prepare_data(config, workdir)
  model = make_model(config.model)
  total_steps = config.train.steps
  tx = make_optimizer(config.optim, total_steps)
  abstract_state, shardings_ = state_shardings(model, tx, config.data.seq_len, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  train_iter = pipeline.train_iterator(corpus.train, config.train.batch_size,
                                       config.data.shuffle_seed, jax.process_index(),
                                       jax.process_count())
  if latest is not None:
    state, train_iter = ckpt.restore(latest, abstract_state, train_iter)
    if primary:
      print(f"resumed from step {latest} in {ckpt.directory}", flush=True)
  else:
    state = init_state(model, tx, config.data.seq_len, config.seed, shardings_)
    if config.train.init_params:
      state = state.replace(params=checkpoint_lib.restore_params(config.train.init_params,
                                                                 abstract_state.params))
      if primary:
        print(f"initialised params from {config.train.init_params}", flush=True)

  step_fn = jit_train_step(config, model, tx, shardings_, batch_sharding)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(shardings_.params, batch_sharding))
  val_batches = [global_batch(b, batch_sharding) for b in pipeline.eval_batches(
      corpus.val, config.train.batch_size, config.train.eval_batches, jax.process_index(),
      jax.process_count())]

  n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = metrics_lib.flops_per_token(config.model, n_params,
                                               config.data.seq_len) * tokens_per_step
  with sharding.activation_sharding(mesh):
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, abstract_batch(config, batch_sharding)).compile()
    compile_seconds = time.perf_counter() - t0
  peak, peak_source = metrics_lib.peak_flops(config.train.peak_flops_per_device,
                                             jnp.dtype(config.model.dtype))
  writer = metrics_lib.MetricsWriter(workdir_path, total_steps, enabled=primary)
  if primary:
    print(f"model: {n_params:,} params | {config.train.batch_size} x {config.data.seq_len} "
          f"tokens/step | mesh {dict(mesh.shape)} | compile {compile_seconds:.1f}s | "
          f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})", flush=True)
    print(f"data: {len(corpus.train):,} train rows, {len(corpus.val):,} val rows | unigram "
          f"baseline val loss {corpus.unigram_loss:.4f}", flush=True)

  def evaluate(params) -> dict:
    with sharding.activation_sharding(mesh):
      sums = [eval_fn(params, b) for b in val_batches]
    nll = sum(float(s[0]) for s in sums)
    tokens = sum(float(s[1]) for s in sums)
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "unigram_loss": corpus.unigram_loss}

  preemption = _Preemption()
  step = int(jax.device_get(state.step))
  last: dict = {}
  t_last, step_last = time.perf_counter(), step
  while step < total_steps:
    batch = global_batch(next(train_iter), batch_sharding)
    with sharding.activation_sharding(mesh):
      state, metrics = step_fn(state, batch)
    step += 1
    done = step == total_steps or preemption.stop_at(step)  # read once: a signal that lands
    # later in this iteration is acted on after the next step, never between log and save
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
  if primary and "eval_loss" in last:
    verdict = "below" if last["eval_loss"] < corpus.unigram_loss else "NOT below"
    print(f"done at step {step}: eval loss {last['eval_loss']:.4f} is {verdict} the unigram "
          f"baseline {corpus.unigram_loss:.4f}", flush=True)
  return last


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  distributed.initialize(FLAGS.config.distributed)
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
