"""The train state, its shardings on a mesh, and its sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm.model import init_params, lora, unbox
from llm.parallel.rules import logical_to_sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
  params: Any
  opt_state: Any
  skipped: jax.Array  # int32 scalar: steps whose update was dropped as non-finite


def _opt_shardings(abstract_opt_state, param_shardings, mesh: Mesh):
  """Each optimizer leaf takes the sharding of the param whose path ends its own."""
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[tuple(path)] = s

  def one(path, leaf):
    for i in range(len(path)):
      s = by_path.get(tuple(path[i:]))
      if s is not None:
        return s
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(model, tx, seq_len: int, mesh: Mesh):
  """(abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings)."""
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0), seq_len))
  param_shardings = logical_to_sharding(boxed, mesh)
  params = unbox(boxed)
  opt_state = jax.eval_shape(tx.init, lora.trainable(params, model.cfg))
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(step=replicated, params=param_shardings,
                         opt_state=_opt_shardings(opt_state, param_shardings, mesh),
                         skipped=replicated)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state, skipped=jax.ShapeDtypeStruct((), jnp.int32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(model, tx, seq_len: int, seed: int, shardings: TrainState) -> TrainState:
  """Initialises params and optimizer state directly into their shardings."""

  def init():
    params = unbox(init_params(model, jax.random.key(seed), seq_len))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(lora.trainable(params, model.cfg)),
                      skipped=jnp.zeros((), jnp.int32))

  return jax.jit(init, out_shardings=shardings)()
