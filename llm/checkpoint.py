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

