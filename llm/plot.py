"""Training curves of one or several runs as a PNG, read from their metrics.jsonl.

    python -m llm.plot runs/tiny [runs/other ...] [--out=curves.png]

Panels (each drawn when some run logged it): loss and eval_loss against step, the
learning rate, tokens/s, and for alignment runs the reward and eval_reward. The default
output is DIR/curves.png for one run and curves.png for several. The Python API is
`plot_runs([dirs], out)`. Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llm.workdir import Workdir

# panel title -> the metrics it draws (solid, then dashed), by their metrics.jsonl names
PANELS = {
    "loss": ("loss", "eval_loss"),
    "learning rate": ("learning_rate",),
    "tokens/s": ("tokens_per_sec",),
    "reward": ("reward", "eval_reward"),
}


def read_metrics(workdir: str | Path) -> list[dict]:
  """The records of DIR/metrics.jsonl in order (a resumed run's re-logged steps keep the
  last record of each step and metric)."""
  path = Workdir(workdir).metrics
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: {str(workdir)!r} is not a training run "
                            "(or it has not logged a step yet)")
  records = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not JSON ({e.msg}); was the file cut short?") from None
  return records


def series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, the last value logged for each step, finite only."""
  by_step: dict[int, float] = {}
  for r in records:
    value = r.get(name)
    if isinstance(value, (int, float)) and math.isfinite(value):
      by_step[int(r["step"])] = float(value)
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_runs(workdirs: list[str | Path], out: str | Path | None = None) -> Path:
  """Writes the curves of `workdirs` to `out` (default: see the module docstring)."""
  if not workdirs:
    raise ValueError("name at least one run directory to plot")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = {str(d): read_metrics(d) for d in workdirs}
  panels = {title: names for title, names in PANELS.items()
            if any(series(records, n)[0] for records in runs.values() for n in names)}
  if not panels:
    raise ValueError(f"{list(runs)} logged none of {sorted({n for v in PANELS.values() for n in v})}")
  out = Path(out) if out else (Workdir(workdirs[0]).curves if len(workdirs) == 1
                               else Path(Workdir(".").curves.name))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  for ax, (title, names) in zip(axes[0], panels.items()):
    for i, (run_dir, records) in enumerate(runs.items()):
      color = f"C{i}"
      for name, style in zip(names, ("-", "--")):
        steps, values = series(records, name)
        if steps:
          label = name if len(runs) == 1 else f"{Path(run_dir).name}: {name}"
          ax.plot(steps, values, style, color=color, label=label, marker="." if len(steps) < 30
                  else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  tmp.replace(out)
  return out


def main(argv: list[str]) -> None:
  path = plot_runs(argv[1:], FLAGS.out or None)
  print(f"wrote {path}")


if __name__ == "__main__":
  from absl import flags

  from llm.cli import run
  flags.DEFINE_string("out", "", "the PNG to write (default: DIR/curves.png for one run)")
  FLAGS = flags.FLAGS
  run(main)
