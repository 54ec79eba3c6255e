"""Orbax checkpoints holding the train state, the data iterator and the config together.

Saves are asynchronous and atomic (written to a temporary directory, then
renamed), and the oldest of `keep` checkpoints is deleted only after a newer
one is complete, so the checkpoint being written is never the only copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"
PARAMS_DIR = "params"  # a params-only checkpoint (converted weights) beside config.json


class Checkpointer:

  def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.directory = Path(directory).absolute()
    self.async_save = async_save
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, DATA, CONFIG))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, config_dict: dict) -> None:
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint for step %d %s", step,
                 "being written in the background" if self.async_save else "written")

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def restore(self, step: int, abstract_state, data_iter=None):
    """(state, data_iter) at `step`; `abstract_state` leaves carry the target shardings."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], restored[DATA] if data_iter is not None else None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_same_model(saved: dict, model_cfg, workdir) -> None:
  """Raises if the checkpoint in `workdir` was written for a different model shape."""
  current = model_cfg.to_dict()
  saved_model = saved.get("model", {})
  shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "tie_embeddings", "qk_norm", "scan_layers")
  diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current[k]!r}"
           for k in shape_keys if saved_model.get(k) != current[k]]
  if diffs:
    raise ValueError(f"the checkpoint in {workdir} is for a different model shape ("
                     + "; ".join(diffs) + "). Use a new --workdir, or the saved config.")



def save_params(path: str | Path, params) -> None:
  """Saves a params-only checkpoint (e.g. converted weights) to `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).absolute(), params)
    ckptr.wait_until_finished()


def restore_params(path: str | Path, abstract_params):
  """Restores a params-only checkpoint onto the shardings of `abstract_params`."""
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"params checkpoint {str(path)!r} does not exist")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_params)


def load_params(workdir: str | Path):
  """(config, params) from `workdir`: its latest training checkpoint, else its params-only
  checkpoint (`llm.convert` output). Params are replicated over all local devices."""
  import ml_collections
  from llm import config as config_lib
  from llm import sharding
  from llm.model import make_model
  from llm.optim import make_optimizer
  from llm.state import state_shardings

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} does not exist: is {workdir} a training workdir?")
  config = config_lib.from_json(config_path.read_text())
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1)))
  tx = make_optimizer(config.optim, config.train.steps)
  abstract, _ = state_shardings(make_model(config.model), tx, config.data.seq_len, mesh)
  ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is not None:
      return config, ckpt.restore(step, abstract)[0].params
  finally:
    ckpt.close()
  if (workdir / PARAMS_DIR).is_dir():
    return config, restore_params(workdir / PARAMS_DIR, abstract.params)
  raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'} and no {workdir / PARAMS_DIR}")
