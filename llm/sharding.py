"""The device mesh, and the ONE table mapping logical axes to mesh axes.

Model code names logical axes ("batch", "embed", "heads", ...). This module
alone knows the mesh: `RULES` maps each logical axis to mesh axes, and
`logical_to_sharding` turns a tree of logical specs into NamedShardings,
leaving a dimension replicated where the mesh axis does not divide it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm.config import MESH_AXES

# logical axis -> mesh axes it is sharded over (in order); absent or None = replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
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
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Axis sizes with a -1 filled in; raises if their product is not n_devices."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  for axis, size in sizes.items():
    if size == -1:
      if n_devices % fixed:
        raise ValueError(f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not "
                         f"divide the {n_devices} devices, so mesh.{axis}=-1 cannot be filled")
      sizes[axis] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but "
                     f"{n_devices} are available; the product of mesh sizes must equal "
                     "the device count (set one axis to -1 to fill in)")
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh over `devices` (default: all). Devices of several TPU slices (multislice)
  are laid out so that only the data axis crosses slices (DCN); the other axes stay
  within a slice's ICI."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if n_slices > 1:
    if sizes["data"] % n_slices:
      raise ValueError(f"the devices span {n_slices} slices, so mesh.data={sizes['data']} must "
                       "be a multiple of the slice count (data parallelism crosses slices over "
                       "DCN; fsdp, tensor and sequence stay inside a slice)")
    ici = tuple(s // n_slices if a == "data" else s for a, s in zip(MESH_AXES, shape))
    dcn = tuple(n_slices if a == "data" else 1 for a in MESH_AXES)
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _rule(logical: str | None):
  if logical is None:
    return ()
  for name, mesh_axes in RULES:
    if name == logical:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise KeyError(f"logical axis {logical!r} has no rule in llm.sharding.RULES")


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


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Context under which model code's `constrain(...)` calls take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, T] input batches, from the "batch" and "length" rules."""
  return NamedSharding(mesh, P(_rule("batch") or None, _rule("length") or None))
