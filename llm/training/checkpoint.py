"""Orbax checkpoints holding the train state, the data iterator and the config together.

Saves are asynchronous and atomic (written to a temporary directory, then
renamed). A finished checkpoint is committed by sealing it with a manifest of its
files' sizes and checksums (written last, atomically); only then is the oldest of
`keep` sealed checkpoints deleted, so the checkpoint being written is never the only
copy, and a checkpoint without its manifest (its writer was killed before sealing it)
always has a sealed one before it. Restoring verifies the manifest and falls back past
damaged or unsealed checkpoints, moving them aside. `check_resumable` refuses a resume that
would change the meaning of what was saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llm import config as config_lib
from llm.model import unbox
from llm.params import abstract_params
from llm.model import lora
from llm.training.optim import make_optimizer
from llm.workdir import (CONFIG_ITEM as CONFIG, DATA_ITEM as DATA, STATE_ITEM as STATE,
                         Damaged, describe, is_sealed, newest_good, write_manifest)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Checkpointer:
  """Keep-N Orbax checkpoints of (train state, data iterator, config), each finished one
  sealed with a manifest (llm.workdir.write_manifest); restore takes the newest good one."""

  def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
    # Orbax keeps every step: retention is ours, applied once a newer one is sealed
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=async_save)
    self.keep = keep
    self.directory = Path(directory).absolute()
    self.async_save = async_save
    self.primary = jax.process_index() == 0
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, DATA, CONFIG))
    self._pending: list[int] = []  # saved, not yet sealed with a manifest
    self._failed = False  # a save failed: closing may not raise its error again

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config_dict: dict) -> None:
    if not bool(_all_finite(state.params)):
      raise ValueError(f"refusing to checkpoint step {step}: the params hold NaN or inf")
    self.wait()  # the previous save is finished and sealed before a new one starts
    self._check_space(step, state)
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    with self._reporting(step):
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._pending.append(step)
    logging.info("checkpoint for step %d %s", step,
                 "being written in the background" if self.async_save else "written")

  def wait(self) -> None:
    """Waits for the save in flight; seals finished checkpoints with their manifest."""
    with self._reporting(self._pending[-1] if self._pending else None):
      self.manager.wait_until_finished()
    if not self._pending:
      return
    if self.primary:
      for step in self._pending:
        write_manifest(self.directory / str(step))  # the commit
      sealed = [s for s in self.manager.all_steps() if is_sealed(self.directory / str(s))]
      for old in sorted(sealed)[:-self.keep]:  # retention, only among sealed ones
        shutil.rmtree(self.directory / str(old))
    self._pending.clear()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints sealed")
    self.manager.reload()

  def _check_space(self, step: int, state) -> None:
    """Refuses, before writing anything, a checkpoint the filesystem has no room for."""
    needed = sum(x.nbytes for x in jax.tree.leaves(state))
    free = shutil.disk_usage(self.directory).free
    if needed > free:
      self._failed = True
      raise CheckpointWriteError(
          f"checkpoint step {step} needs about {needed / 2**20:,.1f} MiB in {self.directory} "
          f"but only {free / 2**20:,.1f} MiB are free; free some space and resume. "
          f"{self._intact(step)}")

  def _intact(self, step) -> str:
    intact = [s for s in self.manager.all_steps() if s != step]
    return (f"The previous checkpoint (step {max(intact)}) is intact." if intact else
            "No checkpoint has been written yet.")

  @contextlib.contextmanager
  def _reporting(self, step):
    """Turns a failed write into one line naming the directory, the free space and the
    newest intact checkpoint."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 (Orbax wraps I/O errors in many types)
      self._failed = True
      free = shutil.disk_usage(self.directory).free / 2**20
      raise CheckpointWriteError(
          f"could not write checkpoint step {step} to {self.directory} ({describe(e)}); "
          f"{free:,.1f} MiB free there. {self._intact(step)}") from e

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def restore(self, step: int, abstract_state, data_iter=None):
    """(state, data_iter) at `step`; `abstract_state` leaves carry the target shardings."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], restored[DATA] if data_iter is not None else None

  def restore_newest_good(self, abstract_state, data_iter, check_saved_config,
                          check_extra=None):
    """(step, state, data_iter) of the newest checkpoint that verifies and restores, or None
    when there is none. `check_saved_config(saved)` may refuse a good checkpoint (its error
    propagates); a damaged one is warned about, moved aside as N.damaged-TIME (nothing
    is deleted) and the one before it tried. `check_extra(step)` returns what is wrong
    with files kept beside the checkpoint (None when nothing), which is damage too.
    Resuming from an older checkpoint retraces the same steps as an uninterrupted run."""
    def attempt(step: int):
      problem = check_extra(step) if check_extra is not None else None
      if problem:
        raise Damaged(problem)
      try:
        saved = self.saved_config(step)
      except Exception as e:  # noqa: BLE001 (an unreadable item is damage)
        raise Damaged(f"its config item is unreadable ({describe(e)})") from e
      check_saved_config(saved)  # a refusal is not damage: it propagates
      try:
        return self.restore(step, abstract_state, data_iter)
      except Exception as e:  # noqa: BLE001
        raise Damaged(f"it could not be restored ({describe(e)})") from e

    found = newest_good(self.directory, self.manager.all_steps(), attempt, self._quarantine)
    return None if found is None else (found[0], *found[1])

  def _quarantine(self, step: int) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} verified")
    if self.primary:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      os.replace(self.directory / str(step),
                 self.directory / f"{step}.damaged-{stamp}-{time.time_ns() % 10**9}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()

  def close(self) -> None:
    """Closes the manager. After a failure (the run is ending with an error already) an
    unfinished save's error is not raised again."""
    if self.manager is None:
      return
    manager, self.manager = self.manager, None
    try:
      manager.close()
    except Exception as e:  # noqa: BLE001
      if not self._failed:
        raise
      logging.warning("closing the checkpoint manager after a failed save: %s", describe(e))


def _layout(tree) -> dict:
  return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _changed(section: str, saved_cfg, cfg, keys=None) -> list[str]:
  keys = cfg.keys() if keys is None else keys
  return [f"{section}.{k}: checkpoint {saved_cfg.get(k)!r}, config {cfg[k]!r}"
          for k in keys if saved_cfg.get(k) != cfg[k]]


# Fields whose change would reinterpret the saved data position (it counts batches of
# rows of the token stream, shuffled by the seed, split by val_fraction).
DATA_POSITION_FIELDS = {"train": ("batch_size",),
                        "data": ("seq_len", "shuffle_seed", "val_fraction", "source", "paths",
                                 "jsonl_key", "tfds_name", "tfds_key", "doc_separator", "store",
                                 "store_weights")}


# Model fields that may change on resume: how the same function is computed (kernels,
# remat, compute dtype, MoE dispatch) and loss weights. Any other model field defines
# the function the weights were trained as (e.g. moe.top_k, rope_theta, lora.alpha).
MODEL_FIELDS_FREE_ON_RESUME = frozenset({
    "attention", "flash_block_q", "flash_block_k", "remat", "dtype", "scan_layers",
    "out_major_kernels", "init_std", "moe.compute", "moe.capacity_factor",
    "moe.load_balance_weight", "moe.router_z_weight", "lora.dropout"})
RUN_FACTS = "_run"  # a key of the saved config item: facts of the run outside the config


def run_facts(corpus) -> dict:
  """What a resume must find unchanged beyond the config: the tokenizer's bytes (another
  tokenizer file turns the same ids into other text, even at the same vocabulary size)."""
  from llm.data.store import sha256_file
  return {"tokenizer_sha256": sha256_file(corpus.tokenizer.path)}


def saved_item(config, facts: dict) -> dict:
  """The config item a checkpoint holds: the config and the run's facts."""
  return {**config.to_dict(), RUN_FACTS: facts}


def check_resumable(saved: dict, config, workdir, facts: dict | None = None) -> None:
  """Raises ValueError, naming the changed fields and the way out, if resuming the
  checkpoint saved with config `saved` under `config` would not continue the same run:
  another model (params tree, shapes or dtypes, or a field that changes what the
  weights compute), another tokenizer (`facts`, see run_facts), a data position that
  would mean other rows, or an optimizer state of another layout. Hyperparameters that
  keep the layout (learning rate, betas, schedule, steps, mesh) may change."""
  saved = dict(saved)
  saved_facts = saved.pop(RUN_FACTS, {})
  saved_cfg = config_lib.base_config()
  saved_cfg.update(saved)
  params = unbox(abstract_params(config.model))
  if _layout(unbox(abstract_params(saved_cfg.model))) != _layout(params):
    raise ValueError(f"the checkpoint in {workdir} is for a different model shape ("
                     + "; ".join(_changed("model", saved_cfg.model, config.model)) +
                     "). Use a new --workdir, or the saved config.")
  then, now = config_lib.flatten(saved_cfg.model), config_lib.flatten(config.model)
  redefined = _changed("model", then, now,
                       sorted(k for k in now if k not in MODEL_FIELDS_FREE_ON_RESUME))
  if redefined:
    raise ValueError(f"resuming the checkpoint in {workdir} with " + "; ".join(redefined) +
                     " would change what its weights were trained to compute. Resume with "
                     "the checkpoint's values, or start a new --workdir with "
                     "--config.train.init_params to keep the weights.")
  for key, value in (facts or {}).items():
    if key in saved_facts and saved_facts[key] != value:
      raise ValueError(f"the checkpoint in {workdir} was trained with another tokenizer "
                       f"(sha256 {saved_facts[key][:12]}..., now {value[:12]}... from "
                       f"{config.data.tokenizer_path or 'the workdir'}): the same token ids "
                       "would mean other text. Resume with the run's tokenizer, or start a new "
                       "--workdir with --config.train.init_params to keep the weights.")
  moved = [c for section, keys in DATA_POSITION_FIELDS.items()
           for c in _changed(section, saved_cfg[section], config[section], keys)]
  moved += _changed("data.chat", saved_cfg.data.chat.to_dict(), config.data.chat.to_dict(),
                    sorted(config.data.chat))
  if moved:
    raise ValueError(f"resuming the checkpoint in {workdir} with " + "; ".join(moved) +
                     " would reinterpret its saved data position (batches of rows already "
                     "read, as they were formatted). Resume with the checkpoint's values, or "
                     "start a new --workdir (e.g. with --config.train.init_params to keep the "
                     "weights).")
  if config.model.lora.rank and saved_cfg.train.init_params != config.train.init_params:
    raise ValueError(f"the checkpoint in {workdir} holds LoRA adapters trained on the base "
                     f"train.init_params={saved_cfg.train.init_params!r}, not "
                     f"{config.train.init_params!r}; resume with that base or use a new "
                     "--workdir")
  opt_layout = lambda cfg: _layout(jax.eval_shape(  # noqa: E731
      make_optimizer(cfg.optim, cfg.train.steps).init, lora.trainable(params, cfg.model)))
  if opt_layout(saved_cfg) != opt_layout(config):
    raise ValueError(f"the checkpoint in {workdir} holds optimizer state of another layout ("
                     + "; ".join(_changed("optim", saved_cfg.optim, config.optim)) +
                     "). Resume with the checkpoint's optimizer settings, or start a new "
                     "--workdir with --config.train.init_params to keep the weights.")
