"""Reference log-probabilities for objectives that compare with the starting model (dpo,
and GRPO's KL penalty).

`train.dpo.reference` (REFERENCE_MODES):
  - "precomputed": computed once, per token of every train and validation row, with the
    weights the run starts from (train.init_params; for a LoRA run its base, as the
    adapters start at zero), and carried by the rows as "ref_logp": the frozen reference
    needs no second copy of the model in memory during training. They are cached in
    DIR/data/ keyed on the rows and the starting weights, so a resumed run (whose params
    have moved on) reads the same reference.
  - "live": computed for each batch as it is used (no pass over the dataset first, nothing
    cached): a LoRA run's reference is its own base with the adapters left out (no second
    copy); any other run keeps a copy of the starting weights.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm.model.transformer import target_nll

CACHE = "reference_logps.npz"
# train.dpo.reference: how the reference log-probabilities are obtained (see above)
REFERENCE_MODES = ("precomputed", "live")


def reference_logps(params, batch, *, model, config=None, temperature: float = 1.0):
  """Per-token log-probabilities of the targets, in the config's train.loss_chunk chunks
  (without a config: the whole sequence at once), of logits / `temperature` (GRPO scores
  at its sampling temperature, as TRL does)."""
  chunk = 0 if config is None else config.train.loss_chunk
  return -target_nll(model, params, batch, chunk_len=chunk, temperature=temperature)[0]


def reference_params(config, params, start_params):
  """The reference policy's params: a LoRA run's base with its adapters at zero (built
  from `params`, so the base is not copied), else `start_params` (the starting weights)."""
  if config.model.lora.rank:
    import jax.numpy as jnp

    from llm.model import lora
    base, adapters = lora.split(params)
    return lora.join(base, jax.tree.map(jnp.zeros_like, adapters))
  return start_params


class LiveReference:
  """Adds "ref_logp" to batches as they are used (train.dpo.reference="live"; GRPO's
  rollouts). `policy_logps` gives the same per-token log-probabilities for any params."""

  def __init__(self, model, batch_sharding, param_shardings, config, start_params=None,
               temperature: float = 1.0):
    self.config, self.start_params = config, start_params
    self.policy_logps = jax.jit(lambda p, b: reference_logps(p, b, model=model, config=config,
                                                             temperature=temperature),
                                in_shardings=(param_shardings, batch_sharding),
                                out_shardings=batch_sharding)

  def logps(self, params, batch):
    """Per-token reference log-probabilities of a batch's targets, for policy `params`."""
    return self.policy_logps(reference_params(self.config, params, self.start_params), batch)

  def attach(self, batch: dict, params) -> dict:
    return {**batch, "ref_logp": self.logps(params, batch)}


def _key(config, rows_list) -> str:
  h = hashlib.sha256()
  for rows in rows_list:
    for k in ("inputs", "targets", "segment_ids", "positions"):
      h.update(np.ascontiguousarray(rows[k]).tobytes())
  h.update(json.dumps({"model": config.model.to_dict(), "init": config.train.init_params,
                       "seed": config.seed}, sort_keys=True).encode())
  return h.hexdigest()


def _compute(rows, params, model, config, mesh, batch_sharding, param_shardings):
  batch_size = config.train.batch_size
  fn = jax.jit(lambda p, b: reference_logps(p, b, model=model, config=config),
               in_shardings=(param_shardings, batch_sharding),
               out_shardings=NamedSharding(mesh, P()))
  n = len(rows["inputs"])
  n_proc, me = jax.process_count(), jax.process_index()
  out = np.zeros(rows["inputs"].shape, np.float32)
  for start in range(0, n, batch_size):
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # the last batch padded
    local = idx.reshape(n_proc, -1)[me]
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, rows[k][local])
             for k in ("inputs", "targets", "segment_ids", "positions")}
    values = np.asarray(fn(params, batch))
    keep = min(batch_size, n - start)
    out[start:start + keep] = values[:keep]
  return out


def attach(config, data_dir, corpus, model, initial_params, mesh, batch_sharding,
           param_shardings) -> None:
  """Adds "ref_logp" to the train and validation rows (from the cache, else computed with
  `initial_params()` and cached)."""
  rows_list = [corpus.train.rows, corpus.val.rows]
  key = _key(config, rows_list)
  path = data_dir / CACHE
  if path.is_file():
    with np.load(path) as z:
      if str(z["key"]) == key:
        corpus.train.rows["ref_logp"], corpus.val.rows["ref_logp"] = z["train"], z["val"]
        return
  if jax.process_index() == 0:
    print("computing reference log-probabilities with the starting weights", flush=True)
  params = initial_params()
  train, val = (_compute(rows, params, model, config, mesh, batch_sharding,
                         param_shardings) for rows in rows_list)
  del params
  corpus.train.rows["ref_logp"], corpus.val.rows["ref_logp"] = train, val
  if jax.process_index() == 0:
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f"{CACHE}.{os.getpid()}.tmp.npz"
    np.savez(tmp, key=key, train=train, val=val)
    os.replace(tmp, path)
