"""The train state, its shardings on a mesh, and its sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data, so checkpoints hold plain arrays
  skipped: jax.Array  # int32 scalar: steps whose update was dropped as non-finite


def _boxed_params(model, seq_len: int, rng):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, tokens)["params"]


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
  boxed = jax.eval_shape(lambda: _boxed_params(model, seq_len, jax.random.key(0)))
  param_shardings = sharding.logical_to_sharding(boxed, mesh)
  params = nn.meta.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(step=replicated, params=param_shardings,
                         opt_state=_opt_shardings(opt_state, param_shardings, mesh),
                         rng=replicated, skipped=replicated)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                        skipped=jax.ShapeDtypeStruct((), jnp.int32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(model, tx, seq_len: int, seed: int, shardings: TrainState) -> TrainState:
  """Initialises params and optimizer state directly into their shardings."""

  def init():
    params_rng, state_rng = jax.random.split(jax.random.key(seed))
    params = nn.meta.unbox(_boxed_params(model, seq_len, params_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng), skipped=jnp.zeros((), jnp.int32))

  return jax.jit(init, out_shardings=shardings)()
