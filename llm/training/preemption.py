"""SIGTERM as a clean stop: the signal sets a flag that the training loop reads once per
step (and once before the first), then it checkpoints and exits 0.

`catch_sigterm()` is called first thing by `python -m llm.train`, so a SIGTERM during
start-up (tokenizing, compiling) is a clean stop too. With several processes, JAX's
preemption sync service (started by jax.distributed.initialize) spreads a notice to all
of them and names one step at which every process stops and checkpoints together.
"""

from __future__ import annotations

import signal
import sys

_requested: list[int] = []  # signals received


def _handle(signum, frame):
  del frame
  if not _requested:
    print(f"received signal {signum}: stopping at the next step boundary with a checkpoint",
          file=sys.stderr, flush=True)
  _requested.append(signum)


def catch_sigterm() -> None:
  try:
    signal.signal(signal.SIGTERM, _handle)
  except ValueError:  # not the main thread (e.g. called from a notebook worker)
    pass


def requested() -> bool:
  """Whether a stop was asked for in this process (single-process runs)."""
  return bool(_requested)


class StopDecision:
  """Whether to stop after a step: the local flag, or across processes JAX's agreed step."""

  def __init__(self):
    import jax
    self.multiprocess = jax.process_count() > 1
    if not self.multiprocess:
      catch_sigterm()

  def stop_at(self, step: int) -> bool:
    if self.multiprocess:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return requested()
