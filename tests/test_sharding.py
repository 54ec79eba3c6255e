import jax
import ml_collections
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llm.model import make_model
from llm.parallel import mesh as mesh_lib
from llm.parallel import rules
from llm.training.optim import make_optimizer
from llm.training.state import state_shardings
from tests.helpers import tiny_config


def _mesh(**sizes):
  cfg = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1))
  cfg.update(sizes)
  return mesh_lib.make_mesh(cfg)


def test_mesh_fills_minus_one_and_checks_product():
  assert mesh_lib.mesh_shape(dict(data=-1, fsdp=2, tensor=2, sequence=1), 8)["data"] == 2
  with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
    mesh_lib.mesh_shape(dict(data=1, fsdp=2, tensor=2, sequence=1), 8)
  with pytest.raises(ValueError, match="fixed axes multiply to 3"):
    mesh_lib.mesh_shape(dict(data=-1, fsdp=3, tensor=1, sequence=1), 8)


def test_logical_specs_follow_the_rules_table():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  assert rules.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16),
                                  mesh) == P(None, "fsdp", "tensor", None)
  assert rules.logical_to_spec(("batch", "length"), (8, 32), mesh) == P(("data", "fsdp"), None)
  # A dimension the mesh axis does not divide stays replicated (1 KV head under tensor=2).
  assert rules.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16),
                                  mesh) == P("fsdp", None, None)
  # batch 2 takes data=2 but cannot also take fsdp=2.
  assert rules.logical_to_spec(("batch",), (2,), mesh) == P("data")
  with pytest.raises(KeyError, match="no rule"):
    rules.logical_to_spec(("bogus",), (4,), mesh)


def test_optimizer_state_is_sharded_like_params():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  cfg = tiny_config()
  tx = make_optimizer(cfg.optim, 10)
  _, shardings = state_shardings(make_model(cfg.model), tx, 32, mesh)
  q = shardings.params["layers"]["attn"]["q"]["kernel"].spec
  assert q == P(None, "fsdp", "tensor", None)
  adam = [x for x in jax.tree.leaves(shardings.opt_state,
                                     is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(x, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert jax.tree.map(lambda s: s.spec, adam[0].mu) == jax.tree.map(lambda s: s.spec, shardings.params)
  assert jax.tree.map(lambda s: s.spec, adam[0].nu) == jax.tree.map(lambda s: s.spec, shardings.params)
