"""What the benchmark scripts share: timing, describing the machine, and appending a
result with its exact command to BENCHMARKS.md, random params of a model config and random
prompts. (Config
files load with llm.config.load_config.)"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, args, repeats: int) -> float:
  """Median wall time of fn(*args) over `repeats` runs, after one untimed (compiling) run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_params(model_cfg):
  """Random params (seed 0) of a model config's shape, unboxed, initialised in one jit."""
  from llm.model import init_params, make_model, unbox
  model = make_model(model_cfg)
  return jax.jit(lambda: unbox(init_params(model, jax.random.key(0))))()


def random_prompts(vocab_size: int, n: int, min_len: int, max_len: int) -> list[list[int]]:
  """`n` prompts of random token ids (3 and up: past the special ids) and random lengths
  in [min_len, max_len], seed 0."""
  import numpy as np
  rng = np.random.default_rng(0)
  return [rng.integers(3, vocab_size, int(length)).tolist()
          for length in rng.integers(min_len, max_len + 1, n)]


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
