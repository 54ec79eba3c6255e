"""The run directory: what lives where, and loading a run for inference.

    DIR/config.json      the run's config (written once a run has started or resumed)
    DIR/config.py        a config file to train from (llm.convert output)
    DIR/tokenizer.model  the tokenizer, unless data.tokenizer_path names one
    DIR/data/            the tokenized corpus cache
    DIR/params/          a params-only Orbax checkpoint (llm.convert output)
    DIR/checkpoints/N/   training checkpoints: items state/, data/ (iterator), config/
    DIR/metrics.jsonl    one JSON object per logged step; TensorBoard events beside it
    DIR/eval.json        llm.evaluate's result

Every module that reads or writes these asks this one. Loading for inference restores
the params subtree of the newest checkpoint only: no optimizer is built or read.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from llm import config as config_lib

CONFIG_JSON = "config.json"
CONFIG_PY = "config.py"
TOKENIZER = "tokenizer.model"
DATA = "data"
PARAMS = "params"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
# items of one training checkpoint
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"


class Workdir:
  """Paths of one run directory."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def __repr__(self) -> str:
    return f"Workdir({str(self.path)!r})"

  config_json = property(lambda self: self.path / CONFIG_JSON)
  config_py = property(lambda self: self.path / CONFIG_PY)
  data = property(lambda self: self.path / DATA)
  params = property(lambda self: self.path / PARAMS)
  checkpoints = property(lambda self: self.path / CHECKPOINTS)
  metrics = property(lambda self: self.path / METRICS)
  eval_json = property(lambda self: self.path / EVAL)

  def tokenizer(self, config) -> Path:
    """The run's tokenizer: data.tokenizer_path, else DIR/tokenizer.model."""
    return Path(config.data.tokenizer_path or self.path / TOKENIZER)

  def read_config(self) -> ml_collections.ConfigDict:
    if not self.config_json.is_file():
      raise FileNotFoundError(f"{self.config_json} does not exist: is {self.path} a training "
                              "or converted workdir?")
    return config_lib.from_json(self.config_json.read_text())

  def write_config(self, config) -> None:
    """Writes config.json atomically (a reader never sees half a file)."""
    self.path.mkdir(parents=True, exist_ok=True)
    tmp = self.config_json.with_name(f".{CONFIG_JSON}.{os.getpid()}.tmp")
    tmp.write_text(config_lib.to_json(config))
    os.replace(tmp, self.config_json)

  def checkpoint_steps(self) -> list[int]:
    """Steps of the finished training checkpoints, oldest first (Orbax writes a step into
    a temporary directory and renames it to its number when complete)."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir()
                  if p.is_dir() and p.name.isdigit())


def load_tokenizer(workdir: str | os.PathLike, config):
  """The run's tokenizer (never trains one)."""
  from llm.data.tokenizer import Tokenizer, check_vocab
  tok = Tokenizer(Workdir(workdir).tokenizer(config))
  check_vocab(tok, config.model.vocab_size)
  return tok


def load_params(workdir: str | os.PathLike, step: int | None = None):
  """(config, params) of `workdir`: the params of its newest training checkpoint (or of
  `step`), else its params-only checkpoint (llm.convert output); replicated over the
  local devices."""
  import jax
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from llm.model import unbox
  from llm.params import abstract_params

  wd = Workdir(workdir)
  config = wd.read_config()
  replicated = NamedSharding(jax.sharding.Mesh(jax.local_devices(), ("all",)), P())
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        unbox(abstract_params(config.model)))
  steps = wd.checkpoint_steps()
  if step is None and steps:
    step = steps[-1]
  if step is not None:
    path = wd.checkpoints / str(step) / STATE_ITEM
    if not path.is_dir():
      raise FileNotFoundError(f"no checkpoint for step {step} in {wd.checkpoints}; have {steps}")
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(path.absolute(), args=ocp.args.PyTreeRestore(
          item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return config, restored["params"]
  if wd.params.is_dir():
    return config, restore_params(wd.params, target)
  raise FileNotFoundError(f"no checkpoint in {wd.checkpoints} and no {wd.params}")


def save_params(path: str | os.PathLike, params) -> None:
  """Saves a params-only checkpoint (e.g. converted weights) to `path`."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).absolute(), params)
    ckptr.wait_until_finished()


def restore_params(path: str | os.PathLike, target):
  """Restores a params-only checkpoint onto the shapes and shardings of `target`."""
  import orbax.checkpoint as ocp
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"params checkpoint {str(path)!r} does not exist")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)
