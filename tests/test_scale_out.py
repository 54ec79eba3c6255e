"""Scale-out: a 2-process run (jax.distributed over gloo, launched by launch/local.py)
against a 1-process run, resuming across it, and restoring onto another mesh shape."""

import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llm.train import train
from tests.helpers import ROOT, losses

CONFIG_FILE = """
from tests.helpers import tiny_config

def get_config():
  c = tiny_config()
  c.data.tokenizer_path = {tokenizer!r}
  c.train.update(steps={steps}, checkpoint_every={checkpoint_every}, keep_checkpoints=3,
                 eval_every=1000)
  c.mesh.update(data=-1)
  return c
"""


def _launch_cmd(tmp_path, tokenizer_path, workdir, steps=8, checkpoint_every=4):
  cfg = tmp_path / "mp_config.py"
  cfg.write_text(CONFIG_FILE.format(tokenizer=tokenizer_path, steps=steps,
                                    checkpoint_every=checkpoint_every))
  return [sys.executable, str(ROOT / "launch" / "local.py"), "-n", "2", "--devices_per_process",
          "2", "--", f"--config={cfg}", f"--workdir={workdir}"]


def _launch(tmp_path, tokenizer_path, workdir, **kw):
  proc = subprocess.run(_launch_cmd(tmp_path, tokenizer_path, workdir, **kw), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout


def test_two_processes_match_one_and_resume(config, tmp_path, tokenizer_path):
  config.train.update(steps=8, checkpoint_every=4)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  one = losses(tmp_path / "one")

  out = _launch(tmp_path, tokenizer_path, tmp_path / "two")
  assert "[p0] model:" in out and "[p1] model:" not in out  # process 0 alone reports
  assert "'data': 4" in out  # one mesh over both processes' 2 devices each
  two = losses(tmp_path / "two")
  assert sorted(two) == list(range(1, 9))
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-5)

  # Lose the last checkpoint: the 2-process job resumes from step 4 and retraces 5..8.
  shutil.rmtree(tmp_path / "two" / "checkpoints" / "8")
  out = _launch(tmp_path, tokenizer_path, tmp_path / "two")
  assert "resumed from step 4" in out
  resumed = losses(tmp_path / "two")
  np.testing.assert_allclose([resumed[s] for s in range(5, 9)], [two[s] for s in range(5, 9)],
                             rtol=1e-6)


@pytest.mark.slow  # one-process SIGTERM handling runs by default (test_resume, test_reliability)
def test_sigterm_stops_all_processes_at_one_step_then_resumes(config, tmp_path,
                                                              tokenizer_path):
  """SIGTERM to the job: both processes checkpoint the same step and exit 0; rerun, the
  job resumes there and finishes with the losses of an uninterrupted run."""
  steps = 300
  config.train.update(steps=steps, checkpoint_every=1000, eval_every=1000)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  workdir = tmp_path / "two"
  cmd = _launch_cmd(tmp_path, tokenizer_path, workdir, steps=steps, checkpoint_every=1000)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 180
  while not (workdir / "metrics.jsonl").is_file() or len(losses(workdir)) < 5:
    assert time.time() < deadline and proc.poll() is None, "the job did not start training"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 5 <= saved[0] < steps, (saved, out[-2000:])
  out = _launch(tmp_path, tokenizer_path, workdir, steps=steps, checkpoint_every=1000)
  assert f"resumed from step {saved[0]}" in out
  one, two = losses(tmp_path / "one"), losses(workdir)
  assert sorted(two) == list(range(1, steps + 1))
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-5)


def test_restore_onto_another_mesh(config, tmp_path, capsys):
  """Saved on data=8, resumed on fsdp=4 x tensor=2: params, optimizer state and data
  position all carry over, so steps 5..8 repeat the uninterrupted run's losses."""
  config.train.update(steps=8, checkpoint_every=4)
  config.mesh.update(data=8)
  train(config, tmp_path)
  first = losses(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "8")
  config.mesh.update(data=1, fsdp=4, tensor=2)
  capsys.readouterr()
  train(config, tmp_path)
  assert "resumed from step 4" in capsys.readouterr().out
  resumed = losses(tmp_path)
  np.testing.assert_allclose([resumed[s] for s in range(5, 9)], [first[s] for s in range(5, 9)],
                             rtol=2e-5)
  # and onto fewer devices: 2 of them, data=2
  shutil.rmtree(tmp_path / "checkpoints" / "8")
  config.mesh.update(data=2, fsdp=1, tensor=1)
  train(config, tmp_path, devices=jax.devices()[:2])
  assert "resumed from step 4" in capsys.readouterr().out
  again = losses(tmp_path)
  np.testing.assert_allclose([again[s] for s in range(5, 9)], [first[s] for s in range(5, 9)],
                             rtol=2e-5)
