"""Training objectives: `train.objective` -> its `Objective` (llm.objectives.base says
what one owns). Adding an objective is a module in this package plus one line in
OBJECTIVES (and, if it has settings, their section in llm/config.py)."""

from __future__ import annotations

import functools

import ml_collections

from llm.objectives import distill, dpo, grpo, kto, orpo, pretrain, reward, sft, simpo
from llm.objectives.base import Objective

OBJECTIVES: dict[str, Objective] = {
    "pretrain": pretrain.OBJECTIVE,
    "sft": sft.OBJECTIVE,
    "dpo": dpo.OBJECTIVE,
    "distill": distill.OBJECTIVE,
    "kto": kto.OBJECTIVE,
    "orpo": orpo.OBJECTIVE,
    "simpo": simpo.OBJECTIVE,
    "reward": reward.OBJECTIVE,
    "grpo": grpo.OBJECTIVE,
}


def get(config) -> Objective:
  return OBJECTIVES[config.train.objective]


def loss_fn(config, model):
  """The objective's loss bound to the model and config: (params, batch[, rng]) ->
  (total, sums)."""
  objective = get(config)
  return functools.partial(objective.loss, model=model,
                           config=ml_collections.FrozenConfigDict(config),
                           **objective.bind(config))


def check(config) -> None:
  """The objective's checks (config validation runs them): its data are where it reads
  them, the model has its head, and its own settings are in range."""
  name, objective = config.train.objective, get(config)
  d, m = config.data, config.model
  reads = objective.data.reads
  if reads and not d.paths:
    raise ValueError(f"train.objective={name!r} reads {reads} from JSONL files: set "
                     "data.paths (comma-separated files or globs)")
  if reads and d.store:
    raise ValueError(f"data.store={d.store!r} holds pretraining rows; train.objective="
                     f"{name!r} reads {reads} from data.paths: leave data.store empty")
  if m.head != objective.head:
    heads = sorted({o.head for o in OBJECTIVES.values()})
    by_head = "; ".join(f"{h!r}: {', '.join(k for k, o in OBJECTIVES.items() if o.head == h)}"
                        for h in heads)
    raise ValueError(f"train.objective={name!r} with model.head={m.head!r}: it trains the "
                     f"{objective.head!r} head (objectives by head: {by_head})")
  objective.check(config)


def check_heldout(config, workdir) -> None:
  """Refuses, before anything is loaded, a run whose objective llm.evaluate cannot measure."""
  name = config.train.objective
  if get(config).heldout is None:
    measured = [k for k, o in OBJECTIVES.items() if o.heldout is not None]
    raise ValueError(f"{workdir} is a train.objective={name!r} run, which llm.evaluate does "
                     f"not measure (it measures {', '.join(measured)} runs): its held-out "
                     "metrics are the eval_* values in its metrics.jsonl (python -m llm.plot)")


def heldout(config, params, tokenizer, workdir, batch_size: int = 8,
            max_batches: int = 0) -> dict:
  """What llm.evaluate reports for a workdir, per its objective: for next-token runs
  loss, perplexity and bits per byte over the validation split; for reward models their
  metrics over the validation pairs. `rows` and `val_rows` say how much was read."""
  check_heldout(config, workdir)
  objective = get(config)
  return objective.heldout(objective, config, params, tokenizer, workdir, batch_size,
                           max_batches)
