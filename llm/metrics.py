"""Training metrics: FLOPs and MFU, and one writer for console, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from llm.config import head_dim

# Dense bf16 peak FLOP/s per chip, by jax device_kind substring.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
}


def flops_per_token(model_cfg, n_params: int, seq_len: int) -> float:
  """Model FLOPs to train on one token: 6 per matmul weight, plus attention scores."""
  c = model_cfg
  lookup_only = 0 if c.tie_embeddings else c.vocab_size * c.d_model  # input embedding table
  attention = 12 * c.n_layers * seq_len * c.n_heads * head_dim(c)
  return 6 * (n_params - lookup_only) + attention


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of an n x n matmul on the default device: a measured peak."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(x, x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def peak_flops(configured: float, dtype=jnp.float32) -> tuple[float, str]:
  """Total peak FLOP/s of the devices in use, and where the number came from."""
  if configured > 0:
    return configured * jax.device_count(), "config"
  kind = jax.devices()[0].device_kind
  if jax.default_backend() == "cpu":
    return measure_matmul_flops(dtype=dtype), "measured matmul"
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops * jax.device_count(), f"datasheet {name}"
  return measure_matmul_flops(dtype=dtype) * jax.device_count(), "measured matmul"


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
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)

  def write(self, step: int, metrics: dict, seconds_per_step: float | None = None) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)
    self._tb.flush()
    parts = [f"step {step}/{self.total_steps}"]
    for k in ("loss", "eval_loss", "eval_perplexity", "learning_rate", "grad_norm"):
      if k in metrics:
        parts.append(f"{k} {float(metrics[k]):.4g}")
    if "tokens_per_sec" in metrics:
      parts.append(f"{float(metrics['tokens_per_sec']):,.0f} tok/s")
    if "mfu" in metrics:
      parts.append(f"mfu {100 * float(metrics['mfu']):.1f}%")
    if seconds_per_step:
      parts.append(f"ETA {_fmt_duration(seconds_per_step * (self.total_steps - step))}")
    print(" | ".join(parts), flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
