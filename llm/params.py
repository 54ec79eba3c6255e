"""Prints a config's parameter count without allocating (jax.eval_shape).

  python -m llm.params --config=configs/llama2_7b.py
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from llm import config as config_lib
from llm.model import make_model


def abstract_params(model_cfg):
  """Shapes of the params, with logical-axis boxes, as jax.ShapeDtypeStruct leaves."""
  model = make_model(model_cfg)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def count_params(model_cfg) -> int:
  leaves = jax.tree_util.tree_leaves(abstract_params(model_cfg))
  return sum(math.prod(x.shape) for x in leaves)


def breakdown(model_cfg) -> dict[str, int]:
  import flax.linen as nn
  params = nn.meta.unbox(abstract_params(model_cfg))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): math.prod(x.shape) for path, x in flat}


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  config_lib.validate(cfg)
  for name, n in breakdown(cfg.model).items():
    print(f"{name:<50s} {n:>16,d}")
  print(f"{'total':<50s} {count_params(cfg.model):>16,d}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  app.run(main)
