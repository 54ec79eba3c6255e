"""What the hardware can do: accelerator tables and a measured peak, in one place.

Used by training MFU (peak FLOP/s), the planner (HBM per chip, slice shapes) and the
Cloud TPU launcher (accelerator types, runtime images). Imports nothing heavy at module
level, so launchers can read the tables without JAX.
"""

from __future__ import annotations

import dataclasses
import time

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  topology: str  # prefix jax.experimental.topologies knows ("v5e", "v5p", ...)
  hbm_bytes: int  # per chip
  cores_per_chip: int  # slice names count TensorCores on v4/v5p (v5p-16 = 8 chips)
  accelerator: str  # Cloud TPU accelerator-type prefix
  runtime: str  # Cloud TPU VM runtime image
  peak_bf16_flops: float  # dense, per chip
  device_kinds: tuple[str, ...]  # jax device_kind strings of this generation
  hbm_bandwidth: float  # bytes/s per chip
  ici_bandwidth: float  # bytes/s per chip, all inter-chip links together
  peak_int8_ops: float = 0.0  # dense int8 ops/s per chip (0: no faster than bf16)
  chips_per_host: int = 4  # the host's share of its DCN bandwidth

  @property
  def dcn_bandwidth(self) -> float:
    """Bytes/s per chip between slices: a host's ~2.5e10 B/s of data-center network (the
    JAX scaling book's figure) shared by its chips (v5p 6.25e9, v5e 3.125e9)."""
    return DCN_BYTES_PER_HOST / self.chips_per_host


DCN_BYTES_PER_HOST = 2.5e10  # data-center network per TPU host (jax-ml scaling book)

# Cloud TPU's published per-chip figures (cloud.google.com/tpu/docs/system-architecture-*):
# HBM GB/s and ICI Gbps (v4 2,400, v5e 1,600, v5p 4,800, v6e 3,584) as bytes/s; peak bf16
# FLOP/s and int8 ops/s (v4 275 / 275 T, v5e 197 / 394, v5p 459 / 918, v6e 918 / 1,836);
# chips per host (v5e and v6e: 8, in 4 x 2).
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 32 * GIB, 2, "v4", "tpu-ubuntu2204-base", 275e12, ("TPU v4",),
                        1228e9, 2400e9 / 8, 275e12),
    "v5e": TpuGeneration("v5e", 16 * GIB, 1, "v5litepod", "v2-alpha-tpuv5-lite", 197e12,
                         ("TPU v5 lite", "TPU v5e"), 819e9, 1600e9 / 8, 394e12, 8),
    "v5p": TpuGeneration("v5p", 95 * GIB, 2, "v5p", "v2-alpha-tpuv5", 459e12, ("TPU v5p", "TPU v5"),
                         2765e9, 4800e9 / 8, 918e12),
    "v6e": TpuGeneration("v6e", 32 * GIB, 1, "v6e", "v2-alpha-tpuv6e", 918e12,
                         ("TPU v6 lite", "TPU v6e"), 1640e9, 3584e9 / 8, 1836e12, 8),
}

# Cloud TPU slice sizes (chips) -> the chip grid: 2D tori (v5e, v6e) and 3D (v4, v5p)
SLICE_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                  256: "16x16"}
SLICE_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                  256: "4x8x8", 512: "8x8x8"}


def slice_grid(gen: str, size: int, what: str) -> str:
  """The chip grid of the Cloud TPU slice `gen`-`size` (size counts TensorCores on v4 and
  v5p, chips on v5e and v6e); ValueError naming `what` for a size no such slice has."""
  per_chip = TPU_GENERATIONS[gen].cores_per_chip
  table = SLICE_GRIDS_2D if gen in ("v5e", "v6e") else SLICE_GRIDS_3D
  if size % per_chip or size // per_chip not in table:
    unit = "chips" if per_chip == 1 else "TensorCores"
    raise ValueError(f"{what}: {size} {unit} is not a {gen} slice size; known: "
                     f"{', '.join(f'{gen}-{c * per_chip}' for c in table)}")
  return table[size // per_chip]


# Dense bf16 peak FLOP/s per GPU, by jax device_kind substring.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def datasheet_peak_flops(device_kind: str) -> tuple[float, str] | None:
  """(peak bf16 FLOP/s per device, table name) for a known device kind, else None."""
  for name, gen in TPU_GENERATIONS.items():
    if any(kind in device_kind for kind in gen.device_kinds):
      return gen.peak_bf16_flops, f"TPU {name}"
  for name, flops in GPU_PEAK_FLOPS.items():
    if name in device_kind:
      return flops, name
  return None


def measure_matmul_flops(n: int = 2048, dtype=None, repeats: int = 5) -> float:
  """Achieved FLOP/s of an n x n matmul on the default device: a measured peak. Random
  operands: zeros or ones run faster than real data on some chips."""
  import jax
  a, b = (jax.random.normal(k, (n, n), dtype or "float32")
          for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def peak_flops(configured: float, dtype=None) -> tuple[float, str]:
  """Total peak FLOP/s of the devices in use, and where the number came from: the
  config, the datasheet, or (on CPU and unknown devices) a measured matmul."""
  import jax
  if configured > 0:
    return configured * jax.device_count(), "config"
  if jax.default_backend() == "cpu":
    return measure_matmul_flops(dtype=dtype), "measured matmul"
  known = datasheet_peak_flops(jax.devices()[0].device_kind)
  if known is not None:
    return known[0] * jax.device_count(), f"datasheet {known[1]}"
  return measure_matmul_flops(dtype=dtype) * jax.device_count(), "measured matmul"
