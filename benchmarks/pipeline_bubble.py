"""The pipeline's bubble on 8 CPU devices against the formula (P - 1) / (R M + P - 1).

Each run trains a few steps of a small model on mesh.pipeline = P (the other devices as
FSDP) with M microbatches of a fixed size (the batch grows with M) and R repeats, so the
schedule runs R M + P - 1 iterations of chunks of 1 / R of a stage's layers. The step
times are fitted as a x (R M + P - 1) / R (the pipelined layers) + b x M (embedding,
head and loss, outside the pipeline) + c; a run's measured bubble is the idle share of
its pipelined part, 1 - a M / (step - b M - c).

On a CPU host the 8 devices share the cores and idle stages run their bubble iterations
anyway (the schedule computes every stage every iteration, as on an accelerator), so
this checks the schedule's iteration count and overhead, not overlap.

    python benchmarks/pipeline_bubble.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_result, machine  # noqa: E402


def _step_seconds(stages: int, repeats: int, micro: int, rows: int, steps: int) -> float:
  """Median step time (s) of a short run, from its metrics (tokens/s)."""
  import json
  import statistics

  from llm.train import train
  from tests.helpers import tiny_config
  c = tiny_config()
  c.model.update(n_layers=8, d_model=128, n_heads=4, n_kv_heads=2, d_ff=512,
                 pipeline_repeats=repeats)
  c.data.seq_len = 128
  c.train.update(batch_size=rows * micro, steps=steps, log_every=1, eval_every=steps,
                 checkpoint_every=steps, pipeline_microbatches=micro)
  c.mesh.update(pipeline=stages, data=1, fsdp=8 // stages)
  out = tempfile.mkdtemp()
  train(c, out)
  rates = [json.loads(line)["tokens_per_sec"] for line in open(Path(out) / "metrics.jsonl")
           if "tokens_per_sec" in line and "eval_loss" not in line][2:]  # warm steps only
  return c.train.batch_size * c.data.seq_len / statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--stages", type=int, default=4)
  parser.add_argument("--rows", type=int, default=4, help="rows per microbatch")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args()
  import numpy as np

  from llm.parallel.pipeline import bubble_fraction
  p = args.stages
  runs = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (2, 8)]  # (repeats, microbatches)
  times = np.asarray([_step_seconds(p, r, m, args.rows, args.steps) for r, m in runs])
  # a chunk is 1/R of a stage's layers: the schedule's work in whole-stage iterations
  work = np.asarray([(r * m + p - 1) / r for r, m in runs], float)
  micro = np.asarray([m for _, m in runs], float)  # embedding, head and loss grow with M
  design = np.stack([work, micro, np.ones_like(work)], axis=1)
  (a, b, c), *_ = np.linalg.lstsq(design, times, rcond=None)
  rows = ["| repeats R | microbatches M | iterations | step s | fit s | formula bubble | "
          "measured bubble |", "|--:|--:|--:|--:|--:|--:|--:|"]
  for (r, m), t, w in zip(runs, times, work):
    stack = t - b * m - c  # the pipelined layers' share of the measured step
    measured = 1 - a * m / stack
    rows.append(f"| {r} | {m} | {r * m + p - 1} | {t:.3f} | {a * w + b * m + c:.3f} | "
                f"{bubble_fraction(p, r, m):.1%} | {measured:.1%} |")
  rows.append(f"\nfit: step = {a * 1e3:.1f} ms x (R M + P - 1) / R + {b * 1e3:.1f} ms x M + "
              f"{c * 1e3:.1f} ms")
  body = "\n".join(rows)
  print(body)
  if not args.no_append:
    append_result(
        "pipeline_bubble: the schedule's idle share vs (P - 1) / (R M + P - 1)",
        f"{machine()}; 8 CPU devices as pipeline={p} x fsdp={8 // p}; 8 layers of d_model 128, "
        f"seq 128, {args.rows} rows per microbatch (the batch grows with M), fp32, median "
        "of the warm steps. Measured bubble = 1 - a M / (step - b M - c) with the fit below. "
        "The host's devices share its cores, so this checks the iteration count and the "
        "schedule's overhead, not overlap.", body)


if __name__ == "__main__":
  main()
