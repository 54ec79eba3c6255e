"""What an objective is, and the batches most objectives train on.

`train.objective` names an `Objective` in OBJECTIVES (llm/objectives/__init__.py). Each
lives in its own module in this package and owns all that differs between objectives:
  - `loss(params, batch, *, model, config, rng=None) -> (total, sums)`, a pure function:
    `total` is the scalar to minimise, summed over the batch's examples; `sums` are
    metric sums by name plus "weight" (target tokens, pairs, ...), which divides `total`
    and every other sum. Sums rather than means let gradient accumulation add
    microbatches exactly as one big batch would. `rng` is a key for LoRA dropout.
    Auxiliary losses the model sows (llm.model.layers.add_aux_loss, e.g. MoE load
    balancing) reach it through llm.model.forward and are added by `with_aux`;
  - `fields`: the [B, T] arrays its batches hold beyond the packed rows' (ROW_FIELDS);
  - `data`: how its data are read, tokenized and packed (an llm.data.pipeline.Reader:
    documents, chat examples, preference pairs, prompts);
  - `batches`: where its batches come from, built from the run (`Run`) into a batch
    source such as `PackedBatches`, which also owns the run's evaluation, the reference
    model the batches are scored with, and any state kept beside the checkpoints;
  - `heldout`: what llm.evaluate reports for its workdirs (None: it refuses them);
  - `head`: the model head it trains; `check`: the checks of its own settings.
The training loop, the data pipeline and llm.evaluate name no objective.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llm.data import pipeline
from llm.model import make_model
from llm.model.layers import AUX_UPDATES
from llm.model.transformer import Aux

# the [B, T] arrays of every packed row, name -> dtype
ROW_FIELDS = {"inputs": "int32", "targets": "int32", "segment_ids": "int32",
              "positions": "int32", "loss_mask": "float32"}

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def with_aux(total, sums: dict, aux: Aux, weight):
  """Adds the model's auxiliary losses (means over the batch) to `total` as sums, and
  its metrics to `sums` (weighted, so the step's division gives their mean)."""
  for name, value in aux.losses.items():
    total = total + weight * value
    sums[name] = weight * value
  for name, value in aux.metrics.items():
    sums[name] = weight * value
  if aux.updates:  # applied by the train step after the optimizer's update
    sums[AUX_UPDATES] = aux.updates
  return total, sums


def weighted_means(sums: list[dict]) -> tuple[dict, float]:
  """(each metric's total over the batches' sums divided by the total weight, that
  weight): a loss's `sums` read as training's eval_* reads them."""
  totals = {k: sum(float(s[k]) for s in sums) for k in sums[0] if k != AUX_UPDATES}
  weight = totals.pop("weight")
  return {k: v / max(weight, 1.0) for k, v in totals.items()}, weight


def global_batch(local: dict, batch_sharding, keys) -> dict:
  """Assembles each process's rows into global arrays laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
          for k in keys}


@dataclasses.dataclass
class Run:
  """What an objective's batches are built from: the training loop's run."""
  config: Any
  workdir: Any  # llm.workdir.Workdir
  corpus: pipeline.Corpus
  model: Any
  batch_sharding: Any  # NamedSharding of a [B, T] batch array
  param_shardings: Any
  loss: Callable  # the objective bound to model and config: (params, batch) -> (total, sums)
  initial_params: Callable[[], Any]  # the weights the run starts from, built anew per call

  @property
  def lora(self) -> bool:
    """Whether the run trains LoRA adapters over a frozen base (a reference for free)."""
    return bool(self.config.model.lora.rank)


class PackedBatches:
  """train.batch_size packed rows per step from the corpus's train split, read by a
  checkpointed grain iterator. Evaluation: the objective's sums over the first
  train.eval_batches validation batches, divided by their weight, as eval_<name> (with
  eval_perplexity where the corpus has a unigram baseline, i.e. next-token targets).

  The loop's side of every batch source: `iterator` (checkpointed with the train state),
  `frozen` and `frozen_shardings` (what the step passes the loss as `frozen=`, if any),
  `checkpoint_problem(step)` (what files kept beside a checkpoint lack), `start(state,
  step)` once the state is restored, `next(state, step)`, `metrics` (what the last batch
  adds to the step's logged metrics), `evaluate(params)`, `evaluate_first` (evaluate
  before the first step too), `save(step)` beside a checkpoint, and `summary(last)`, the
  closing line (None: none)."""

  evaluate_first = False
  frozen: tuple = ()  # inputs the loss reads and never trains (a teacher's params), if any
  frozen_shardings = None

  def __init__(self, objective: "Objective", run: Run, rows_per_batch: int | None = None):
    self.run = run
    c = run.config
    self.keys = tuple(objective.batch_fields())  # what a batch holds (a source may add some)
    self.iterator = pipeline.train_iterator(run.corpus.train, rows_per_batch or c.train.batch_size,
                                            c.data.shuffle_seed, jax.process_index(),
                                            jax.process_count())
    self.metrics: dict = {}
    self.val: list[dict] = []

  def checkpoint_problem(self, step: int) -> str | None:
    del step
    return None

  def start(self, state, step: int) -> None:
    del state, step
    run, c = self.run, self.run.config
    frozen = (self.frozen_shardings,) if self.frozen else ()
    self.eval_fn = jax.jit(lambda p, b, *f: run.loss(p, b, **({"frozen": f[0]} if f else {})),
                           in_shardings=(run.param_shardings, run.batch_sharding, *frozen))
    self.val = [global_batch(b, run.batch_sharding, self.keys)
                for b in pipeline.eval_batches(run.corpus.val, c.train.batch_size,
                                               c.train.eval_batches, jax.process_index(),
                                               jax.process_count())]

  def next(self, state, step: int) -> dict:
    del state, step
    return global_batch(next(self.iterator), self.run.batch_sharding, self.keys)

  def evaluate(self, params) -> dict:
    means, _ = weighted_means(
        [jax.device_get(self.eval_fn(params, b, *self.frozen)[1]) for b in self.val])
    out = {f"eval_{k}": v for k, v in means.items()}
    unigram = self.run.corpus.unigram_loss
    if np.isfinite(unigram):  # next-token targets
      out["eval_perplexity"] = float(np.exp(min(out["eval_loss"], 50.0)))
      out["unigram_loss"] = unigram
    return out

  def save(self, step: int) -> None:
    del step

  def summary(self, step: int, last: dict) -> str | None:
    corpus = self.run.corpus
    if "eval_loss" not in last or not np.isfinite(corpus.unigram_loss):
      return None
    verdict = "below" if last["eval_loss"] < corpus.unigram_loss else "NOT below"
    n_val = len(self.val) * self.run.config.train.batch_size
    return (f"done at step {step}: eval loss {last['eval_loss']:.4f} (the first {n_val:,} of "
            f"{len(corpus.val):,} validation rows) is {verdict} the unigram baseline "
            f"{corpus.unigram_loss:.4f}")


def validation_metrics(objective: "Objective", config, params, tokenizer, workdir,
                       batch_size: int, max_batches: int) -> dict:
  """llm.evaluate of a run whose loss needs nothing beyond its rows (no reference, no
  sampling): the loss's metrics over the validation rows (all of them, or the first
  max_batches x batch_size), each sum divided by the total weight, as training's eval_*
  computes them; `weight` (pairs, tokens, ...), `rows` and `val_rows` say how much."""
  rows = objective.data.prepare(config, workdir, tokenizer).val
  n_batches = -(-len(rows) // batch_size)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  loss = jax.jit(functools.partial(objective.loss, model=make_model(config.model),
                                   config=config))
  keys = objective.batch_fields()
  sums = []
  for i in range(n_batches):
    index = range(i * batch_size, min((i + 1) * batch_size, len(rows)))
    batch = {k: jnp.asarray(np.stack([rows[j][k] for j in index])) for k in keys}
    sums.append(jax.device_get(loss(params, batch)[1]))
  means, weight = weighted_means(sums)
  return {**means, "weight": int(weight), "rows": min(n_batches * batch_size, len(rows)),
          "val_rows": len(rows)}


def _no_checks(config) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class Objective:
  """One training objective (see the module docstring)."""
  loss: LossFn
  data: pipeline.Reader = pipeline.DOCUMENTS
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  batches: Callable[["Objective", Run], Any] = PackedBatches
  # (objective, config, params, tokenizer, workdir, batch_size, max_batches) -> metrics,
  # e.g. validation_metrics
  heldout: Callable | None = None
  head: str = "lm"
  check: Callable[[Any], None] = _no_checks
  # config -> what else the loss is bound to besides model and config (a teacher model)
  bind: Callable[[Any], dict] = lambda config: {}

  def batch_fields(self) -> dict[str, str]:
    """Name -> dtype of every [B, T] array in one of its batches."""
    return {**ROW_FIELDS, **self.fields}

  def abstract_batch(self, config, batch_sharding) -> dict:
    """Shapes, dtypes and sharding of one global batch, for compiling ahead of time."""
    return {k: jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len),
                                    jnp.dtype(dtype), sharding=batch_sharding)
            for k, dtype in self.batch_fields().items()}
