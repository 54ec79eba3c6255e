"""The ONE table mapping logical axes to mesh axes.

Model code names logical axes ("batch", "embed", "heads", ...). `RULES` maps each
logical axis to mesh axes, and `logical_to_sharding` turns a tree of logical specs
into NamedShardings, leaving a dimension replicated where the mesh axis does not
divide it.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axes it is sharded over (in order); absent or None = replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "expert", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),  # an MoE layer's expert axis
    ("latent", "fsdp"),  # MLA's low-rank q / kv width (split where no embed axis is)
    ("head_dim", None),
    ("layers", "pipeline"),  # the scanned layer stack: stages of the pipeline
    ("norm", None),
)


def _rule(logical: str | None):
  if logical is None:
    return ()
  for name, mesh_axes in RULES:
    if name == logical:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise KeyError(f"logical axis {logical!r} has no rule in llm.parallel.rules.RULES")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for one array; drops mesh axes that are used already or don't divide."""
  used: set[str] = set()
  spec = []
  for logical, dim in zip(logical_axes, shape):
    chosen = []
    for axis in _rule(logical):
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size):
        continue
      chosen.append(axis)
      used.add(axis)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


def logical_to_sharding(abstract_boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned boxes."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(one, abstract_boxed_tree,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def flax_rules(mesh: Mesh):
  """RULES for flax's activation constraints, without axes of size 1."""
  out = []
  for name, mesh_axes in RULES:
    axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, T] input batches, from the "batch" and "length" rules."""
  return NamedSharding(mesh, P(_rule("batch") or None, _rule("length") or None))


def batch_axes() -> tuple[str, ...]:
  """The mesh axes a batch is split over (the "batch" rule)."""
  return _rule("batch")


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the mesh axes the "batch" rule names."""
  return math.prod(mesh.shape[a] for a in batch_axes())
