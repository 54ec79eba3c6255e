"""Orbax checkpoints holding the train state, the data iterator and the config together.

Saves are asynchronous and atomic (written to a temporary directory, then
renamed), and the oldest of `keep` checkpoints is deleted only after a newer
one is complete, so the checkpoint being written is never the only copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from llm import config as config_lib
from llm.model import unbox
from llm.params import abstract_params
from llm.workdir import CONFIG_ITEM as CONFIG, DATA_ITEM as DATA, STATE_ITEM as STATE


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
  """Raises if the checkpoint in `workdir` was written for a model whose params differ
  (tree, shapes or dtypes) from `model_cfg`'s."""
  saved_cfg = config_lib.base_config().model
  saved_cfg.update(saved.get("model", {}))

  def shapes(cfg):
    tree = unbox(abstract_params(cfg))
    return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  before, now = shapes(saved_cfg), shapes(model_cfg)
  if before == now:
    return
  diffs = [f"{k}: checkpoint {before.get(k, 'absent')}, config {now.get(k, 'absent')}"
           for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  changed = [f"model.{k}: checkpoint {saved_cfg[k]!r}, config {model_cfg[k]!r}"
             for k in model_cfg.keys() if saved_cfg.get(k) != model_cfg[k]]
  raise ValueError(f"the checkpoint in {workdir} is for a different model shape ("
                   + "; ".join(changed or diffs[:5]) + "). Use a new --workdir, or the saved "
                   "config.")
