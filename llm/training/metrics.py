"""One writer for training metrics: console (a line per logged step, or a live progress
bar in a notebook), DIR/metrics.jsonl, TensorBoard and, optionally, Weights & Biases."""

from __future__ import annotations

import json
import math
import sys
import uuid
from pathlib import Path

from llm.workdir import Workdir

# train.progress: how the console shows the run
PROGRESS = ("auto", "lines", "bar")
# the metrics the console line and the progress bar show, in order
SHOWN = ("loss", "eval_loss", "eval_perplexity", "eval_accuracy", "reward", "kl", "eval_reward",
         "learning_rate", "grad_norm")


def in_notebook() -> bool:
  """Whether this runs in a Jupyter/Colab kernel (where a progress bar renders live)."""
  shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", None)
  return bool(shell and shell() is not None and "IPKernelApp" in getattr(shell(), "config", {}))


def _fmt_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes one record per logged step to the console, DIR/metrics.jsonl, TensorBoard and
  (train.wandb_project set) Weights & Biases."""

  def __init__(self, workdir: str | Path, total_steps: int, enabled: bool = True,
               train_cfg=None, config_dict: dict | None = None, first_step: int = 0):
    self.enabled, self.total_steps = enabled, total_steps
    self.workdir = Path(workdir)
    self._tb = self._bar = self._wandb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(self.workdir))
    self._jsonl = open(Workdir(self.workdir).metrics, "a", buffering=1)
    progress = train_cfg.progress if train_cfg is not None else "lines"
    if progress == "bar" or (progress == "auto" and in_notebook()):
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)
    if train_cfg is not None and train_cfg.wandb_project:
      self._wandb = _start_wandb(self.workdir, train_cfg, config_dict or {})

  def write(self, step: int, metrics: dict, seconds_per_step: float | None = None) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      if math.isfinite(float(v)):  # a skipped step's NaN loss is in metrics.jsonl
        self._tb.add_scalar(k, float(v), step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
    if self._bar is not None:
      self._show_on_bar(step, metrics)
      return
    parts = [f"step {step}/{self.total_steps}"]
    for k in SHOWN:
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

  def _show_on_bar(self, step: int, metrics: dict) -> None:
    """The bar moves to `step` and shows loss and tokens/s (tqdm adds rate and ETA); an
    evaluation is also written above it as a line, so it stays visible."""
    shown = {k: f"{float(metrics[k]):.4g}" for k in ("loss", "reward") if k in metrics}
    if "tokens_per_sec" in metrics:
      shown["tok/s"] = f"{float(metrics['tokens_per_sec']):,.0f}"
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)
    evals = [f"{k} {float(metrics[k]):.4g}" for k in SHOWN if k.startswith("eval_") and k in metrics]
    if evals:
      self._bar.write(f"step {step}: " + " | ".join(evals))

  def close(self) -> None:
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()
      if self._wandb is not None:
        self._wandb.finish()


def _start_wandb(workdir: Path, train_cfg, config_dict: dict):
  """A W&B run for the workdir; a resumed run continues the same W&B run (its id is kept in
  the workdir). train.wandb_mode (online | offline | disabled; "" = WANDB_MODE or online)."""
  try:
    import wandb
  except ImportError:
    raise ImportError(f"train.wandb_project={train_cfg.wandb_project!r} logs to Weights & "
                      "Biases: pip install -e '.[wandb]' (or leave it empty)") from None
  id_file = Workdir(workdir).wandb_id
  run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
  id_file.write_text(run_id)
  return wandb.init(project=train_cfg.wandb_project, entity=train_cfg.wandb_entity or None,
                    name=workdir.name, id=run_id, resume="allow", dir=str(workdir),
                    config=config_dict, mode=train_cfg.wandb_mode or None)
