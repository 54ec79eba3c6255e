"""Checkpoints: a run killed with SIGKILL and restarted matches an uninterrupted run bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from llm.train import train
from tests.helpers import ROOT

CONFIG_FILE = """
from tests.helpers import tiny_config

def get_config():
  c = tiny_config()
  c.data.tokenizer_path = {tokenizer!r}
  c.train.update(steps={steps}, checkpoint_every=3, keep_checkpoints=2)
  return c
"""


def _cmd(tmp_path, tokenizer_path, workdir, steps=12):
  cfg = tmp_path / "config.py"
  cfg.write_text(CONFIG_FILE.format(tokenizer=tokenizer_path, steps=steps))
  return [sys.executable, "-m", "llm.train", f"--config={cfg}", f"--workdir={workdir}"]


def _env():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(ROOT))
  return env


def _records(workdir):
  """The last record logged for each step (a resumed run re-logs steps after its checkpoint)."""
  out = {}
  for line in open(workdir / "metrics.jsonl"):
    r = json.loads(line)
    out[r["step"]] = r
  return out


def _finished_steps(workdir):
  """Steps whose checkpoint is sealed (a kill can leave a newer one unsealed, which resume
  passes over)."""
  from llm.workdir import is_sealed
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and is_sealed(p)) \
      if d.is_dir() else []


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, tokenizer_path):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  subprocess.run(_cmd(tmp_path, tokenizer_path, ref_dir), check=True, env=_env(), cwd=ROOT,
                 capture_output=True)
  proc = subprocess.Popen(_cmd(tmp_path, tokenizer_path, run_dir), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not any(s >= 6 for s in _finished_steps(run_dir)):
    assert proc.poll() is None, "training ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_finished_steps(run_dir))
  assert killed_at < 12
  result = subprocess.run(_cmd(tmp_path, tokenizer_path, run_dir), env=_env(), cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {killed_at}" in result.stdout
  ref, run = _records(ref_dir), _records(run_dir)
  assert sorted(ref) == list(range(1, 13))
  for step in range(killed_at + 1, 13):
    assert run[step]["loss"] == ref[step]["loss"], step  # bitwise: JSON floats round-trip
    assert run[step]["grad_norm"] == ref[step]["grad_norm"], step
  assert run[12]["eval_loss"] == ref[12]["eval_loss"]
  assert len(_finished_steps(run_dir)) <= 2  # keep_checkpoints


def test_sigterm_saves_and_exits_cleanly(tmp_path, tokenizer_path):
  run_dir = tmp_path / "run"
  proc = subprocess.Popen(_cmd(tmp_path, tokenizer_path, run_dir, steps=100000), env=_env(),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (run_dir / "metrics.jsonl").exists() or len(_records(run_dir)) < 2:
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr[-3000:]
  last_logged = max(_records(run_dir))
  assert last_logged < 100000
  assert max(_finished_steps(run_dir)) == last_logged


def test_resuming_with_a_different_model_shape_is_refused(config, tmp_path):
  config.train.update(steps=2, checkpoint_every=2)
  one_device = jax.devices()[:1]
  train(config, tmp_path, devices=one_device)
  config.model.d_model = 96
  with pytest.raises(ValueError, match="different model shape.*model.d_model: checkpoint 64, config 96"):
    train(config, tmp_path, devices=one_device)
