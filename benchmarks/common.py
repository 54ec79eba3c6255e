"""What the benchmark scripts share: loading a config file, describing the machine, and
appending a result with its exact command to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import importlib.util
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def median_seconds(fn, args, repeats: int) -> float:
  """Median wall time of fn(*args) over `repeats` runs, after one untimed (compiling) run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def machine() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform} / {dev.device_kind} / {platform.machine()} / jax {jax.__version__}"


def append_result(title: str, description: str, body: str, env_prefix: str = "") -> None:
  """Appends '## title — date', the command that ran, a description and the body."""
  cmd = f"{env_prefix}python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}"
  header = (f"\n## {title} — {datetime.date.today().isoformat()}\n\n`{cmd.strip()}`\n\n"
            f"{description}\n\n")
  with open(ROOT / "BENCHMARKS.md", "a") as f:
    f.write(header + body + "\n")
