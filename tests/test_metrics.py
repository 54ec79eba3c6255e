"""The metrics writer's console modes (lines, a live progress bar) and Weights & Biases
logging (offline), beside metrics.jsonl."""

import json

import pytest

from llm.config import validate
from llm.training.metrics import MetricsWriter, in_notebook
from tests.helpers import tiny_config


def _records(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_lines_and_bar(tmp_path, capsys):
  cfg = tiny_config().train
  cfg.progress = "lines"
  w = MetricsWriter(tmp_path / "a", 10, train_cfg=cfg)
  w.write(5, {"loss": 2.5, "tokens_per_sec": 1000.0}, seconds_per_step=0.5)
  w.close()
  out = capsys.readouterr()
  assert "step 5/10 | loss 2.5 | 1,000 tok/s | ETA 0m02s" in out.out
  assert not in_notebook()  # pytest is no Jupyter kernel: "auto" means lines here
  cfg.progress = "bar"
  w = MetricsWriter(tmp_path / "b", 10, train_cfg=cfg, first_step=2)
  w.write(5, {"loss": 2.5, "tokens_per_sec": 1000.0}, seconds_per_step=0.5)
  w.write(10, {"loss": 2.0, "eval_loss": 2.25, "tokens_per_sec": 1000.0}, seconds_per_step=0.5)
  assert w._bar.n == 10
  w.close()
  out = capsys.readouterr()
  assert "step 10: eval_loss 2.25" in out.out  # evaluations stay visible above the bar
  assert "10/10" in out.err and "loss=2" in out.err and "tok/s=1,000" in out.err
  assert [r["step"] for r in _records(tmp_path / "b")] == [5, 10]
  cfg.progress = "spinner"
  c = tiny_config()
  c.train.progress = "spinner"
  with pytest.raises(ValueError, match="train.progress='spinner'"):
    validate(c)


def test_wandb_offline_run_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = tiny_config().train
  cfg.update(progress="lines", wandb_project="llm-tests", wandb_mode="offline")
  w = MetricsWriter(tmp_path, 10, train_cfg=cfg, config_dict={"x": 1})
  w.write(1, {"loss": 3.0})
  w.write(2, {"loss": 2.0})
  w.close()
  run_id = (tmp_path / "wandb_run_id").read_text()
  runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
  w = MetricsWriter(tmp_path, 10, train_cfg=cfg, config_dict={"x": 1})  # a resumed run
  w.write(3, {"loss": 1.0})
  w.close()
  assert (tmp_path / "wandb_run_id").read_text() == run_id
