"""One writer for training metrics: console, DIR/metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llm.workdir import Workdir


def _fmt_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes one record per logged step to the console, DIR/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str | Path, total_steps: int, enabled: bool = True):
    self.enabled, self.total_steps = enabled, total_steps
    self.workdir = Path(workdir)
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir))
      self._jsonl = open(Workdir(self.workdir).metrics, "a", buffering=1)

  def write(self, step: int, metrics: dict, seconds_per_step: float | None = None) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      if math.isfinite(float(v)):  # a skipped step's NaN loss is in metrics.jsonl
        self._tb.add_scalar(k, float(v), step)
    self._tb.flush()
    parts = [f"step {step}/{self.total_steps}"]
    for k in ("loss", "eval_loss", "eval_perplexity", "eval_accuracy", "reward", "kl",
              "eval_reward", "learning_rate", "grad_norm"):
      if k in metrics:
        parts.append(f"{k} {float(metrics[k]):.4g}")
    if "tokens_per_sec" in metrics:
      parts.append(f"{float(metrics['tokens_per_sec']):,.0f} tok/s")
    if "mfu" in metrics:
      parts.append(f"mfu {100 * float(metrics['mfu']):.1f}%")
    if float(metrics.get("skipped_steps", 0)) > 0:
      parts.append(f"skipped {int(metrics['skipped_steps'])} non-finite steps")
    if seconds_per_step:
      parts.append(f"ETA {_fmt_duration(seconds_per_step * (self.total_steps - step))}")
    print(" | ".join(parts), flush=True)

  def close(self) -> None:
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._tb.close()
