"""The pure train step, `train_step(state, batch) -> (state, metrics)`, with the objective's
loss passed in; the jitted step that the loop runs and the planner and benchmarks compile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from llm.config import scan_unit
from llm.model import lora
from llm.model.layers import AUX_UPDATES, apply_param_updates
from llm.parallel import pipeline
from llm.parallel.rules import batch_axes, data_parallel_size
from llm.training.optim import schedule
from llm.training.state import TrainState


def microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch i taking rows i, i+n, ... (spread over devices)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch, frozen_inputs=None, *, objective, tx, lr_schedule,
               grad_accum: int, frozen_base: bool = False, dropout_seed: int | None = None):
  """One optimizer step on `objective(params, batch) -> (total, sums)` (see llm.objectives.base).
  With `frozen_base` (LoRA) only the adapters are differentiated and updated (`tx` and
  the optimizer state cover them alone); the base passes through untouched (it may even
  be stored quantized). A step whose loss, gradients or update are not finite leaves
  params and optimizer state unchanged and counts as skipped. With `dropout_seed` the
  objective gets `rng=`, a key of (seed, step, microbatch): a resumed run draws the same
  dropout masks. `frozen_inputs` (e.g. a teacher's params) reach the objective as
  `frozen=`, whole in every microbatch, and get no gradient."""
  frozen, trainable = lora.split(state.params) if frozen_base else (None, state.params)
  on_params = objective if not frozen_base else (
      lambda t, b, **kw: objective(lora.join(frozen, t), b, **kw))
  step_key = (None if dropout_seed is None else
              jax.random.fold_in(jax.random.key(dropout_seed), state.step))

  def loss_fn(t, b, i):  # i: the microbatch, for its dropout key
    kw = {} if step_key is None else {"rng": jax.random.fold_in(step_key, i)}
    if frozen_inputs is not None:
      kw["frozen"] = frozen_inputs
    return on_params(t, b, **kw)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (total, sums), grads = grad_fn(trainable, batch, 0)
  else:
    parts = microbatches(batch, grad_accum)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], parts), 0))

    def add(carry, indexed):
      i, microbatch = indexed
      return jax.tree.map(jnp.add, carry, grad_fn(trainable, microbatch, i)), None

    ((total, sums), grads), _ = jax.lax.scan(add, zeros, (jnp.arange(grad_accum), parts))
  weight = jnp.maximum(sums.pop("weight"), 1.0)
  param_updates = sums.pop(AUX_UPDATES, None)  # e.g. the MoE balancing bias
  grads = jax.tree.map(lambda g: g / weight, grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new = optax.apply_updates(trainable, updates)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new = keep(new, trainable)
  params = lora.join(frozen, new) if frozen_base else new
  if param_updates is not None:
    params = keep(apply_param_updates(params, param_updates), params)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=keep(opt_state, state.opt_state),
                            skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = {name: value / weight for name, value in sums.items()}
  metrics.update(objective=total / weight, weight=weight, grad_norm=grad_norm,
                 learning_rate=lr_schedule(state.step), skipped_steps=new_state.skipped,
                 step_finite=finite.astype(jnp.int32))
  return new_state, metrics


def check_batch(config, mesh) -> None:
  dp = data_parallel_size(mesh)
  b, accum = config.train.batch_size, config.train.grad_accum
  if b % (dp * accum):
    axes = " x ".join(a for a in batch_axes() if a != "expert" or mesh.shape[a] > 1)
    raise ValueError(f"train.batch_size={b} must be divisible by the data-parallel size "
                     f"(mesh {axes} = {dp}) times train.grad_accum={accum}")
  if config.data.seq_len % mesh.shape["sequence"]:
    raise ValueError(f"data.seq_len={config.data.seq_len} must be divisible by "
                     f"mesh.sequence={mesh.shape['sequence']}")
  check_pipeline(config, mesh)


def check_pipeline(config, mesh) -> None:
  """Refuses, in one line, a pipeline (mesh.pipeline > 1) the schedule cannot run."""
  n = pipeline.stages(mesh)
  m, t = config.model, config.train
  if n == 1:
    return
  if not m.scan_layers:
    raise ValueError(f"mesh.pipeline={n} splits the scanned layer stack into stages; "
                     "model.scan_layers=False has none (set it to True)")
  samples = t.objective == "grpo" or (t.objective == "distill" and t.distill.lmbda)
  if samples and t.sampler == "decoder":
    raise ValueError(f"mesh.pipeline={n} samples with the engine (train.sampler='engine'), "
                     "which unstacks the layers; train.sampler='decoder' decodes the scanned "
                     "stack, which a pipeline splits")
  if not pipeline.splits(m, n):
    layers, unit = scan_unit(m)
    what = f"model.n_layers={m.n_layers}" + (
        f" less moe.first_dense={m.moe.first_dense}" if layers != m.n_layers else "")
    per = f" x the layers' repeating pattern {unit}" if unit > 1 else ""
    raise ValueError(f"{what} must be divisible by mesh.pipeline={n} x "
                     f"model.pipeline_repeats={m.pipeline_repeats}{per} (each stage runs "
                     "whole chunks of layers)")
  micro = pipeline.microbatch_count(t.pipeline_microbatches, n)
  rows = t.batch_size // t.grad_accum
  dp = data_parallel_size(mesh)
  if rows % (micro * dp):
    raise ValueError(f"train.batch_size / grad_accum = {rows} rows must split into "
                     f"train.pipeline_microbatches={micro} microbatches of a multiple of the "
                     f"data-parallel size {dp}")
  if m.pipeline_repeats > 1 and micro < n:
    raise ValueError(f"model.pipeline_repeats={m.pipeline_repeats} (circular) needs "
                     f"train.pipeline_microbatches >= mesh.pipeline={n}; got {micro}")


def jit_train_step(config, loss, tx, shardings, batch_sharding, frozen_shardings=None):
  """The train step for `config` minimising `loss` (the objective bound to its model:
  llm.objectives.loss_fn), jitted with the state's and batch's shardings (and those of the
  frozen inputs, when the objective has any; the state is donated): what the loop runs
  and what llm.plan compiles for a topology."""
  frozen = () if frozen_shardings is None else (frozen_shardings,)
  return jax.jit(
      functools.partial(train_step, objective=loss, tx=tx,
                        lr_schedule=schedule(config.optim, config.train.steps),
                        grad_accum=config.train.grad_accum,
                        frozen_base=bool(config.model.lora.rank),
                        dropout_seed=config.seed if config.model.lora.rank and
                        config.model.lora.dropout else None),
      in_shardings=(shardings, batch_sharding, *frozen), out_shardings=(shardings, None),
      donate_argnums=0)
