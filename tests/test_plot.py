"""llm.plot: curves of one or several runs from metrics.jsonl to a PNG."""

import json
import subprocess
import sys

import numpy as np
import pytest

from llm.plot import plot_runs, series
from tests.helpers import ROOT


def _run(path, losses, resumed_at=None):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({"step": step, "loss": loss, "learning_rate": 1e-3 * step,
                          "tokens_per_sec": 1000.0 + step}) + "\n")
    f.write(json.dumps({"step": len(losses), "eval_loss": losses[-1] + 0.1}) + "\n")
    if resumed_at:  # a resumed run logs the steps after its checkpoint again
      f.write(json.dumps({"step": resumed_at, "loss": -1.0}) + "\n")


def test_plots_one_and_several_runs(tmp_path):
  matplotlib = pytest.importorskip("matplotlib")
  _run(tmp_path / "a", [3.0, 2.5, 2.0, float("nan")], resumed_at=2)
  _run(tmp_path / "b", [4.0, 3.0])
  records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  assert series(records, "loss") == ([1, 2, 3], [3.0, -1.0, 2.0])  # last per step, finite
  one = plot_runs([tmp_path / "a"])
  assert one == tmp_path / "a" / "curves.png"
  image = matplotlib.image.imread(one)
  assert image.shape[0] == 360 and image.shape[1] == 3 * 450  # loss, lr, tokens/s panels
  assert np.std(image) > 0  # something is drawn
  both = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png")
  assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(FileNotFoundError, match="is not a training run"):
    plot_runs([tmp_path / "missing"])
  result = subprocess.run([sys.executable, "-m", "llm.plot", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 1 and result.stderr.count("\n") == 1
  assert "is not a training run" in result.stderr
