"""llm: a JAX-first stack for training decoder-only language models.

Importing the package (before jax) keeps JAX from starting the TPU runtime on a machine
with no accelerator attached: with libtpu installed (the `tpu` extra, for ahead-of-time
TPU compiles) JAX would otherwise try it first and print pages of libtpu errors on every
CPU-only start. JAX_PLATFORMS set by the user, or JAX_FORCE_TPU_INIT, wins.
"""

import glob
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips attach as PCI devices of this vendor
_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _cpu_only_without_accelerators() -> None:
  if ("JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ
      or any(map(os.path.exists, _GPU_DEVICES))):
    return
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return
    except OSError:
      continue
  os.environ["JAX_PLATFORMS"] = "cpu"  # for JAX imported from here on, and subprocesses
  if "jax" in sys.modules:  # imported already: its config, while no backend is up yet
    import jax
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
      jax.config.update("jax_platforms", "cpu")


_cpu_only_without_accelerators()
