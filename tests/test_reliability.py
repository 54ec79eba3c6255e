"""What happens when things go wrong: bad inputs get one clear line and a non-zero exit,
divergence stops the run, damaged checkpoints are passed over, resumes that would change
the run's meaning are refused, one run per workdir, clean stops."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import workdir as workdir_lib
from llm.data import pipeline, sources
from llm.train import train
from llm.training.checkpoint import CheckpointWriteError
from llm.training.loop import TrainingDiverged
from tests.helpers import ROOT, losses, tiny_config

ONE = jax.devices()[:1]  # runs on one CPU device: quick, and comparable with each other


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


# ----------------------------------------------------------------------- bad inputs

CONFIG_FILE = """
from tests.helpers import tiny_config

def get_config():
  c = tiny_config()
  c.data.tokenizer_path = {tokenizer!r}
  c.data.update({data!r})
  c.train.update(steps=2, checkpoint_every=2)
  return c
"""


def _config_file(tmp_path, tokenizer_path, name="config.py", **data):
  path = tmp_path / name
  path.write_text(CONFIG_FILE.format(tokenizer=tokenizer_path, data=data))
  return str(path)


def _bad_inputs(tmp_path, tokenizer_path):
  """(argv, expected message) for each command-line mistake."""
  cfg = _config_file(tmp_path, tokenizer_path)
  (tmp_path / "int.jsonl").write_text('{"text": "fine"}\n{"text": 12345}\n')
  (tmp_path / "null.jsonl").write_text('{"text": null}\n')
  (tmp_path / "scalar.jsonl").write_text('42\n')
  (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50)
  (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama", ')
  (tmp_path / "hf2").mkdir()
  (tmp_path / "hf2" / "config.json").write_text('{"model_type": "llama", "num_attention_heads": 4}')
  (tmp_path / "syntax.py").write_text("def get_config():\n  return tiny_config(\n")
  dpo = tiny_config()
  dpo.data.paths = "pairs.jsonl"
  dpo.train.objective = "dpo"
  workdir_lib.Workdir(tmp_path / "dpo_run").write_config(dpo)
  train_ = lambda *a: ["llm.train", f"--config={cfg}", f"--workdir={tmp_path / 'w'}", *a]  # noqa: E731
  data = lambda name, **kw: ["llm.train", f"--workdir={tmp_path / ('w_' + name)}",  # noqa: E731
                             "--config=" + _config_file(tmp_path, tokenizer_path, f"{name}.py", **kw)]
  return [
      (train_("--config.optim.b1=1.5"), "optim.b1=1.5 must be in [0, 1)"),
      (train_("--config.optim.min_lr_ratio=5"), "optim.min_lr_ratio=5.0 must be in [0, 1]"),
      (train_("--config.optim.clip_norm=-1"), "optim.clip_norm=-1.0 must be in [0, inf]"),
      (train_("--config.train.z_loss=-1"), "train.z_loss=-1.0 must be in [0, inf]"),
      (train_("--config.optim.eps=0"), "optim.eps=0.0 must be in (0, inf]"),
      (train_("--config.model.rope_theta=0"), "model.rope_theta=0.0 must be in (0, inf]"),
      (train_("--config.data.tokenizer_max_chars=0"), "data.tokenizer_max_chars=0 must be in (0"),
      (train_("--config.data.doc_separator=(["), "data.doc_separator='([' is not a valid regular"),
      (train_("--config.mesh.stages=2"), "cannot apply --config.mesh.stages=2: the config has "
                                         "no field 'stages'"),
      (data("int", source="jsonl", paths=str(tmp_path / "int.jsonl")),
       "int.jsonl:2: 'text' (data.jsonl_key) holds a number (12345), not a string"),
      (data("null", source="jsonl", paths=str(tmp_path / "null.jsonl")),
       "null.jsonl:1: 'text' (data.jsonl_key) holds null, not a string"),
      (data("scalar", source="jsonl", paths=str(tmp_path / "scalar.jsonl")),
       "scalar.jsonl:1 is a JSON number, not an object"),
      (data("latin1", source="text", paths=str(tmp_path / "latin1.txt")),
       "latin1.txt: byte 3 is not valid utf-8"),
      (data("blob", source="text", paths=str(tmp_path / "blob.bin")), "blob.bin: "),
      (["llm.evaluate", f"--workdir={tmp_path}", "--batch_size=0"], "--batch_size=0 must be in [1"),
      (["llm.evaluate", f"--workdir={tmp_path}", "--max_batches=-1"], "--max_batches=-1 must be in"),
      (["llm.generate", f"--workdir={tmp_path}", "--temperature=nan"], "temperature=nan must be in"),
      (["llm.generate", f"--workdir={tmp_path}", "--max_tokens=0"], "--max_tokens=0 must be in [1"),
      (["llm.plan", f"--config={cfg}", "--topology=v5e-4", "--num_slices=0"],
       "--num_slices=0 must be in [1"),
      (["llm.convert", "hf-to-llm", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'o1'}"],
       "config.json is not valid JSON"),
      (["llm.convert", "hf-to-llm", f"--hf_dir={tmp_path / 'hf2'}", f"--workdir={tmp_path / 'o2'}"],
       "config.json has no 'hidden_size', which a Llama or Mistral config needs"),
      (["llm.generate", f"--workdir={tmp_path}", "--system=Be brief.", "--prompt=hi"],
       "--system is a system message of the chat template: add --chat"),
      (["llm.train", f"--config={tmp_path / 'syntax.py'}", f"--workdir={tmp_path / 'w'}"],
       "syntax.py has a syntax error at line 2"),
      (train_("--config.data.curate.stages=quality"), "data.curate.stages='quality' curates a "
                                                       "token store"),
      (["llm.evaluate", f"--workdir={tmp_path / 'dpo_run'}"],
       "dpo_run is a train.objective='dpo' run, which llm.evaluate does not measure"),
      (["llm.merge", f"--config={tmp_path / 'hf' / 'config.json'}", f"--out={tmp_path / 'm'}"],
       "the merge config is not valid YAML"),
  ]


def test_bad_inputs_get_one_clear_line_and_a_non_zero_exit(tmp_path, tokenizer_path):
  cases = _bad_inputs(tmp_path, tokenizer_path)
  procs = []
  for i, (argv, _) in enumerate(cases):  # two at a time: the machine has two cores
    procs.append(subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    if i % 2:
      procs[-2].wait()
  for (argv, expected), proc in zip(cases, procs):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, (argv, out, err)
    assert "Traceback" not in err, (argv, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], (argv, err[-2000:])
  for argv in (["llm.train", "--help"], ["llm.convert", "--helpshort"]):  # help is a success
    helped = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=_env(),
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--workdir" in helped.stdout, helped.stderr[-2000:]
  # nothing was left behind by the failed conversions, nor trained on bad data
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
  assert not (tmp_path / "w_int" / "metrics.jsonl").exists()


def test_no_tpu_runtime_starts_on_a_machine_without_one():
  """With libtpu installed (the tpu extra), JAX would try the TPU first and print libtpu's
  errors; the package keeps to the CPU where no accelerator is attached."""
  env = {k: v for k, v in _env().items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", "import llm.cli, jax; print(jax.devices()[0].platform)"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "libtpu" not in out.stderr, out.stderr


def test_text_encoding_is_strict_unless_told(tmp_path, config):
  path = tmp_path / "latin1.txt"
  path.write_bytes("d\u00e9j\u00e0 vu\n".encode("latin-1"))
  config.data.update(source="text", paths=str(path), doc_separator="")
  with pytest.raises(ValueError, match=r"latin1.txt: byte 1 is not valid utf-8"):
    list(sources.documents(config.data))
  config.data.encoding = "latin-1"
  assert list(sources.documents(config.data)) == ["d\u00e9j\u00e0 vu\n"]
  config.data.update(encoding="utf-8", encoding_errors="replace")
  assert list(sources.documents(config.data)) == ["d\ufffdj\ufffd vu\n"]


def test_token_cache_follows_the_files(tmp_path, config):
  """Rewriting a data file and re-running rebuilds the cached token stream."""
  path = tmp_path / "corpus.txt"
  words = "the quick brown fox jumps over the lazy dog. " * 400
  path.write_text(words)
  config.data.update(source="text", paths=str(path), doc_separator="")
  first = pipeline.token_stream(config, tmp_path / "w", pipeline.load_or_train_tokenizer(
      config, tmp_path / "w", pipeline.DOCUMENTS))[0]
  path.write_text(words * 2)
  second = pipeline.token_stream(config, tmp_path / "w", pipeline.load_or_train_tokenizer(
      config, tmp_path / "w", pipeline.DOCUMENTS))[0]
  assert len(second) > 1.9 * len(first)


# ------------------------------------------------------------------ divergence


def test_non_finite_steps_stop_the_run_and_no_bad_checkpoint_is_written(config, tmp_path):
  config.optim.update(lr=1e6, warmup_steps=0)
  config.train.update(steps=40, checkpoint_every=1, max_consecutive_skips=3)
  with pytest.raises(TrainingDiverged, match=r"the last 3 steps .* non-finite .* lower "
                                             r"--config.optim.lr \(now 1e\+06\)"):
    train(config, tmp_path, devices=ONE)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert records[-1]["step"] < 40 and records[-1]["skipped_steps"] >= 3
  _, params = workdir_lib.load_params(tmp_path)
  assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(params))


# -------------------------------------------------------------- damaged checkpoints

def _damage(step_dir, how):
  files = sorted((p for p in step_dir.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: (p.stat().st_size, str(p)))
  if how == "bitflip":
    victim = files[-1]
    data = bytearray(victim.read_bytes())
    data[64:128] = bytes(b ^ 0xFF for b in data[64:128])
    victim.write_bytes(bytes(data))
  elif how == "truncate":
    victim = files[-1]
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
  elif how == "delete":
    victim = files[-1]
    victim.unlink()
  elif how == "empty":
    victim = step_dir
    for p in step_dir.iterdir():
      shutil.rmtree(p) if p.is_dir() else p.unlink()
  elif how == "unsealed":  # killed between writing the files and sealing them
    victim = step_dir / "manifest.json"
    victim.unlink()
  elif how == "garble_json":
    victim = next(p for p in files if p.parent.name == "config" and p.name == "metadata")
    victim.write_text(victim.read_text()[:-7] + "}{oops")
  return victim


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_path):
  root = tmp_path_factory.mktemp("finished")
  c = tiny_config()
  c.data.tokenizer_path = tokenizer_path
  c.train.update(steps=12, checkpoint_every=4, keep_checkpoints=2)
  train(c, root / "run", devices=jax.devices()[:1])
  return c, root / "run"


def test_checkpoints_are_sealed_and_only_sealed_ones_count_for_retention(finished_run):
  _, run = finished_run
  steps = workdir_lib.Workdir(run).checkpoint_steps()
  assert steps == [8, 12]  # keep_checkpoints=2: step 4 went once 12 was sealed
  assert all(workdir_lib.is_sealed(run / "checkpoints" / str(s)) for s in steps)


@pytest.mark.parametrize("how", ["bitflip", "truncate", "delete", "empty", "garble_json",
                                 "unsealed"])
def test_damaged_latest_checkpoint_falls_back_and_resumes_bitwise(finished_run, tmp_path, how,
                                                                   capfd):
  config, run = finished_run
  work = tmp_path / "run"
  shutil.copytree(run, work)
  victim = _damage(work / "checkpoints" / "12", how)
  _, expected_params = workdir_lib.load_params(work, step=8)
  _, params = workdir_lib.load_params(work)  # generate/evaluate take the newest good one
  jax.tree.map(np.testing.assert_array_equal, params, expected_params)
  err = capfd.readouterr().err
  assert "checkpoint step 12" in err and "damaged" in err
  train(config, work, devices=ONE)
  out, err = capfd.readouterr()
  assert "resumed from step 8" in out
  assert "checkpoint step 12" in err and (how == "empty" or victim.name in err), err
  ref, now = losses(run), losses(work)
  assert [now[s] for s in range(9, 13)] == [ref[s] for s in range(9, 13)]  # bitwise
  assert any(p.name.startswith("12.damaged-") for p in (work / "checkpoints").iterdir())


# ------------------------------------------------------------ resumes that mislead


@pytest.mark.parametrize("change,message", [
    (dict(train=dict(batch_size=16)), "train.batch_size: checkpoint 8, config 16 would "
                                      "reinterpret its saved data position"),
    (dict(data=dict(seq_len=16)), "data.seq_len: checkpoint 32, config 16"),
    (dict(optim=dict(clip_norm=0.0)), "optimizer state of another layout"),
    (dict(model=dict(param_dtype="bfloat16")), "different model shape.*model.param_dtype"),
])
def test_resume_that_would_change_meaning_is_refused(finished_run, tmp_path, change, message):
  config, run = finished_run
  config = config_lib.from_json(config_lib.to_json(config))
  shutil.copytree(run, tmp_path / "run")
  saved_config = (tmp_path / "run" / "config.json").read_text()
  config.train.steps = 16
  for section, values in change.items():
    config[section].update(values)
  with pytest.raises(ValueError, match=message):
    train(config, tmp_path / "run", devices=ONE)
  assert (tmp_path / "run" / "config.json").read_text() == saved_config  # untouched


def _saved(config, **facts):
  from llm.training.checkpoint import saved_item
  return saved_item(config_lib.from_json(config_lib.to_json(config)), facts)


@pytest.mark.parametrize("change,message", [
    (dict(model=dict(rope_theta=500000.0)), r"model.rope_theta: checkpoint 10000.0, config 500000.0 "
                                            r"would change what its weights were trained to compute"),
    (dict(model=dict(lora=dict(alpha=32.0))), r"model.lora.alpha: checkpoint 16.0, config 32.0"),
    (dict(data=dict(chat=dict(template="chatml"))), r"data.chat.template: checkpoint '', config "
                                                     r"'chatml' would reinterpret"),
])
def test_a_resume_under_other_meaning_is_refused(change, message):
  from llm.training.checkpoint import check_resumable
  config = tiny_config()
  saved = _saved(config, tokenizer_sha256="a" * 64)
  for section, values in change.items():
    config[section].update(values)
  if "lora" in change.get("model", {}):
    config.model.lora.rank = 4
    saved["model"]["lora"]["rank"] = 4
  with pytest.raises(ValueError, match=message):
    check_resumable(saved, config, "W", {"tokenizer_sha256": "a" * 64})


def test_a_resume_with_another_tokenizer_or_top_k_is_refused():
  from llm.training.checkpoint import check_resumable
  config = tiny_config()
  saved = _saved(config, tokenizer_sha256="a" * 64)
  check_resumable(saved, config, "W", {"tokenizer_sha256": "a" * 64})  # the same run
  with pytest.raises(ValueError, match=r"trained with another tokenizer \(sha256 aaaaaaaaaaaa..., "
                                       r"now bbbbbbbbbbbb..."):
    check_resumable(saved, config, "W", {"tokenizer_sha256": "b" * 64})
  config.model.update(mlp="moe")
  config.model.moe.update(n_experts=4, top_k=2)
  saved = _saved(config)
  config.model.moe.top_k = 1
  with pytest.raises(ValueError, match=r"model.moe.top_k: checkpoint 2, config 1"):
    check_resumable(saved, config, "W", {})
  config.model.moe.update(top_k=2, compute="capacity")  # how it is computed may change
  check_resumable(saved, config, "W", {})


def test_init_params_of_another_shape_say_what_differs(finished_run):
  from llm.model import unbox
  from llm.params import abstract_params
  config, run = finished_run
  other = config_lib.from_json(config_lib.to_json(config))
  other.model.d_ff = 256
  target = unbox(abstract_params(other.model))
  with pytest.raises(ValueError, match=r"holds a model of another shape than this one "
                                       r"\(model.d_ff 128 vs 256 there vs here\): "
                                       r"\['layers'\]\['mlp'\]"):
    workdir_lib.restore_params(run, target, model_cfg=other.model)


def test_a_finished_run_says_so_and_does_nothing(finished_run, tmp_path, capfd):
  config, run = finished_run
  shutil.copytree(run, tmp_path / "run")
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  last = train(config, tmp_path / "run", devices=ONE)
  out = capfd.readouterr().out
  assert f"the run in {tmp_path / 'run'} is complete: its checkpoint is at step 12 of " \
         "train.steps=12; nothing to do" in out
  assert "compile" not in out and (tmp_path / "run" / "metrics.jsonl").read_text() == before
  assert last["loss"] == losses(run)[12]


def test_a_lower_learning_rate_may_resume(finished_run, tmp_path):
  config, run = finished_run
  config = config_lib.from_json(config_lib.to_json(config))
  shutil.copytree(run, tmp_path / "run")
  config.train.steps = 13
  config.optim.lr = config.optim.lr / 10
  train(config, tmp_path / "run", devices=ONE)
  assert sorted(losses(tmp_path / "run")) == list(range(1, 14))


# --------------------------------------------------------------- one run per dir


def test_second_run_in_a_workdir_is_refused_and_a_killed_holder_frees_it(config, tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from llm.workdir import Workdir\n"
       f"with Workdir({str(tmp_path)!r}).lock():\n  print('locked', flush=True); time.sleep(600)"],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(RuntimeError, match=rf"{tmp_path} is in use by another run \(pid "
                                         rf"{holder.pid} on "):
    train(config, tmp_path, devices=ONE)
  assert not (tmp_path / "metrics.jsonl").exists()
  holder.kill()  # SIGKILL: no clean-up ran, yet the lock is free
  holder.wait()
  config.train.update(steps=2, checkpoint_every=2)
  train(config, tmp_path, devices=ONE)
  assert sorted(losses(tmp_path)) == [1, 2]


# ------------------------------------------------------------------ operations


def test_sigterm_during_start_up_is_a_clean_stop(tmp_path):
  """Killed while training its tokenizer: exit 0, says it stopped, and a re-run trains."""
  cfg = tmp_path / "config.py"
  cfg.write_text("from tests.helpers import tiny_config\n\ndef get_config():\n"
                 "  c = tiny_config()\n  c.train.update(steps=2, checkpoint_every=2)\n  return c\n")
  cmd = [sys.executable, "-m", "llm.train", f"--config={cfg}", f"--workdir={tmp_path / 'w'}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert "training a 512-piece sentencepiece tokenizer" in line, line
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped early (signal)" in out and "Re-run the same command" in out
  assert "done at step" not in out
  again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "done at step 2" in again.stdout


def test_launcher_stops_the_others_when_one_worker_dies(tmp_path, tokenizer_path):
  cfg = tmp_path / "config.py"
  cfg.write_text(f"from tests.helpers import tiny_config\n\ndef get_config():\n"
                 f"  c = tiny_config()\n  c.data.tokenizer_path = {tokenizer_path!r}\n"
                 f"  c.mesh.data = -1\n"
                 f"  c.train.update(steps=100000, checkpoint_every=100000, eval_every=100000)\n"
                 f"  return c\n")
  cmd = [sys.executable, "launch/local.py", "-n", "2", "--devices_per_process=1",
         "--grace_seconds=5", "--", f"--config={cfg}", f"--workdir={tmp_path / 'w'}"]
  launcher = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
  deadline = time.time() + 240
  for line in launcher.stdout:  # wait until training runs
    if line.startswith("[p0] step "):
      break
    assert time.time() < deadline
  children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                            text=True).stdout.split()
  assert len(children) == 2
  os.kill(int(children[1]), signal.SIGKILL)
  t0 = time.time()
  launcher.stdout.read()
  launcher.wait(timeout=120)
  assert launcher.returncode != 0
  assert time.time() - t0 < 60  # not the ~100 s heartbeat timeout
  assert all(subprocess.run(["kill", "-0", c], capture_output=True).returncode != 0
             for c in children)


def test_exported_safetensors_are_readable_by_others(tmp_path):
  from llm.convert.hf import write_safetensors
  write_safetensors(iter([("w", np.zeros((2, 2), np.float32))]), tmp_path)
  mode = (tmp_path / "model.safetensors").stat().st_mode & 0o777
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask


def test_values_are_checked_before_any_work(config, tmp_path):
  config.optim.b1 = 1.5
  with pytest.raises(ValueError, match=r"optim.b1=1.5 must be in \[0, 1\)"):
    train(config, tmp_path / "w", devices=ONE)
  assert not (tmp_path / "w").exists()
  config.optim.b1 = math.nan
  with pytest.raises(ValueError, match="optim.b1=nan must be in"):
    train(config, tmp_path / "w", devices=ONE)


def test_a_full_disk_fails_in_one_line_and_keeps_the_previous_checkpoint(config, tmp_path):
  small = tmp_path / "small"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)],
                    capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    config.train.update(steps=40, checkpoint_every=4, keep_checkpoints=5)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step (\d+) needs about [\d.]+ MiB "
                                                   r"in .* but only [\d.]+ MiB are free.*The "
                                                   r"previous checkpoint \(step \d+\) is intact"):
      train(config, small / "w", devices=ONE)
    config_, params = workdir_lib.load_params(small / "w")  # the previous one loads
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(params))
  finally:
    subprocess.run(["umount", str(small)], check=True)
