"""Scale-out: a 2-process run (jax.distributed over gloo, launched by launch/local.py)
against a 1-process run, resuming across it, and restoring onto another mesh shape."""

import shutil
import subprocess
import sys

import jax
import numpy as np

from llm.train import train
from tests.helpers import ROOT, losses

CONFIG_FILE = """
from tests.helpers import tiny_config

def get_config():
  c = tiny_config()
  c.data.tokenizer_path = {tokenizer!r}
  c.train.update(steps=8, checkpoint_every=4, keep_checkpoints=3)
  c.mesh.update(data=-1)
  return c
"""


def _launch(tmp_path, tokenizer_path, workdir, n=2):
  cfg = tmp_path / "mp_config.py"
  cfg.write_text(CONFIG_FILE.format(tokenizer=tokenizer_path))
  cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "-n", str(n), "--devices_per_process",
         "2", "--", f"--config={cfg}", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
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
