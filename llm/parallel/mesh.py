"""The device mesh: its axes, their sizes from config, and the ambient mesh.

`use_mesh(mesh)` is the one place the ambient mesh is set: under it, model code's
`constrain(...)` calls and the attention dispatch see the mesh and the rules table.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from llm.parallel.rules import flax_rules

# The mesh axes, in device-layout order (innermost last). config.mesh gives their sizes; an
# axis it leaves out has size 1. "expert" splits the batch like "data" and holds a share of
# every MoE layer's experts (expert parallelism); "pipeline" splits the scanned layers
# into stages (llm.parallel.pipeline).
MESH_AXES = ("pipeline", "data", "expert", "fsdp", "tensor", "sequence")


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Axis sizes with a -1 filled in; raises if their product is not n_devices."""
  sizes = {a: int(mesh_cfg[a]) if a in mesh_cfg else 1 for a in MESH_AXES}
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
  are laid out so that only one axis crosses slices (DCN): the pipeline's when
  mesh.pipeline is a multiple of the slice count (stages exchange one microbatch's
  activations per step), else data's; the other axes stay within a slice's ICI."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if n_slices > 1:
    across = "pipeline" if sizes["pipeline"] > 1 and sizes["pipeline"] % n_slices == 0 else "data"
    if sizes[across] % n_slices:
      raise ValueError(f"the devices span {n_slices} slices, so mesh.data={sizes['data']} (or "
                       f"mesh.pipeline={sizes['pipeline']}) must be a multiple of the slice count "
                       "(data parallelism or the pipeline crosses slices over DCN; fsdp, tensor "
                       "and sequence stay inside a slice)")
    ici = tuple(s // n_slices if a == across else s for a, s in zip(MESH_AXES, shape))
    dcn = tuple(n_slices if a == across else 1 for a in MESH_AXES)
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)



@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """The ambient mesh: jax's (for shard_map and sharding constraints) and flax's logical
  rules (for model code's `constrain(...)`)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
    yield
