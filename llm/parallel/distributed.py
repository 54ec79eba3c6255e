"""Joining JAX's multi-controller runtime: one process per host (or per GPU), all running
the same program over one global mesh.

`initialize(config.distributed)` runs before anything touches devices. Sources, in order:
  1. config.distributed.coordinator / num_processes / process_id (command-line overrides);
  2. the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
     (what launch/local.py and launch/slurm.py export);
  3. a detected cluster, for which JAX finds everything itself: SLURM with more than one
     task, or a multi-worker Cloud TPU VM (TPU_WORKER_HOSTNAMES lists several workers,
     or LLM_MULTIHOST=1 as launch/tpu.py sets).
With none of these, it is a single-process run and nothing is initialised.
"""

from __future__ import annotations

import os

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
MODES = ("auto", "always", "never")  # config.distributed.initialize


def _detected_cluster() -> str | None:
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "cloud-tpu"
  if os.environ.get("LLM_MULTIHOST") == "1":
    return "launcher"
  return None


def initialize(dist_cfg) -> str:
  """Initialises jax.distributed when this run is one of several processes.

  Returns how: "single-process", "config", "env", or the detected cluster's name."""
  mode = dist_cfg.initialize
  if mode not in MODES:
    raise ValueError(f"distributed.initialize={mode!r}; allowed: {MODES}")
  if mode == "never":
    return "single-process"
  if jax.distributed.is_initialized():
    return "already"
  if dist_cfg.coordinator:
    if dist_cfg.num_processes < 1 or dist_cfg.process_id < 0:
      raise ValueError(
          f"distributed.coordinator={dist_cfg.coordinator!r} needs distributed.num_processes "
          f"(got {dist_cfg.num_processes}) >= 1 and distributed.process_id (got "
          f"{dist_cfg.process_id}) in [0, num_processes)")
    if dist_cfg.process_id >= dist_cfg.num_processes:
      raise ValueError(f"distributed.process_id={dist_cfg.process_id} must be < "
                       f"distributed.num_processes={dist_cfg.num_processes}")
    jax.distributed.initialize(dist_cfg.coordinator, dist_cfg.num_processes,
                               dist_cfg.process_id)
    return "config"
  present = [v for v in ENV if v in os.environ]
  if present:
    missing = [v for v in ENV if v not in os.environ]
    if missing:
      raise ValueError(f"{present} are set but {missing} are not: set all three for a "
                       "multi-process run, or none")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    return "env"
  cluster = _detected_cluster()
  if cluster is not None or mode == "always":
    jax.distributed.initialize()  # JAX's own cluster detection fills in the rest
    return cluster or "jax-autodetect"
  return "single-process"
