"""Parameter counts without allocating (jax.eval_shape): total, and active per token.

  python -m llm.params --config=configs/llama2_7b.py
"""

from __future__ import annotations

import math

import jax
from absl import flags
from ml_collections import config_flags

from llm import cli
from llm import config as config_lib
from llm.model import init_params, make_model, unbox
from llm.model.mlp import MLPS


def abstract_params(model_cfg):
  """Shapes of the params, with logical-axis boxes, as jax.ShapeDtypeStruct leaves."""
  model = make_model(model_cfg)
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def count_params(model_cfg) -> int:
  leaves = jax.tree_util.tree_leaves(abstract_params(model_cfg))
  return sum(math.prod(x.shape) for x in leaves)


def active_params(model_cfg) -> int:
  """Parameters one token's forward pass goes through: all of them in a dense model; an
  MLP kind with `active_fraction(cfg, path)` (e.g. routed experts) counts less."""
  fraction = getattr(MLPS[model_cfg.mlp], "active_fraction", None)
  if fraction is None:
    return count_params(model_cfg)
  return int(sum(n * fraction(model_cfg, path) for path, n in breakdown(model_cfg).items()))


def breakdown(model_cfg) -> dict[str, int]:
  params = unbox(abstract_params(model_cfg))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): math.prod(x.shape) for path, x in flat}


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  config_lib.validate(cfg)
  for name, n in breakdown(cfg.model).items():
    print(f"{name:<50s} {n:>16,d}")
  total, active = count_params(cfg.model), active_params(cfg.model)
  if active != total:
    print(f"{'active per token':<50s} {active:>16,d}")
  print(f"{'total':<50s} {total:>16,d}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  cli.run(main)
