"""Launch scripts: their --dry_run output is the exact commands, and the SLURM script
runs (with stub srun/scontrol) into the environment llm/distributed.py expects."""

import os
import shlex
import stat
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _dry(script, *args):
  out = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


def test_tpu_single_slice_lifecycle():
  lines = _dry("tpu.py", "--name=run1", "--zone=us-west4-a", "--accelerator=v5e-16",
               "--project=p", "--dry_run", "all", "--", "--config=configs/llama2_7b.py",
               "--workdir=gs://b/runs/7b")
  create, archive, scp, install, run, delete = lines
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "run1"]
  assert "--accelerator-type=v5litepod-16" in create and "--zone=us-west4-a" in create
  assert "--project=p" in create and "--version=v2-alpha-tpuv5-lite" in create
  assert archive[:2] == ["git", "-C"] and "HEAD" in archive
  assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "run1:~/llm-src.tar.gz"
  assert install[4] == "ssh" and "--worker=all" in install
  assert 'pip install -q -e ".[tpu]"' in install[-1]
  assert run[4] == "ssh" and "--worker=all" in run
  remote = run[-1].removeprefix("--command=")
  assert "LLM_MULTIHOST=1 .venv/bin/python -m llm.train --config=configs/llama2_7b.py " \
         "--workdir=gs://b/runs/7b" in remote and "MEGASCALE" not in remote
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "run1"]


def test_tpu_multislice_uses_queued_resources_and_megascale():
  lines = _dry("tpu.py", "--name=ms", "--zone=z", "--accelerator=v5p-128", "--num_slices=2",
               "--spot", "--dry-run", "all", "--", "--workdir=gs://b/r")
  assert lines[0][0].startswith("SLICE0_IP=$(gcloud")  # coordinator lookup, printed first
  create = lines[1]
  assert create[3:6] == ["queued-resources", "create", "ms"]
  assert "--node-count=2" in create and "--accelerator-type=v5p-128" in create
  assert "--spot" in create
  runs = [line for line in lines if line[4:5] == ["ssh"] and "llm.train" in line[-1]]
  assert [r[5] for r in runs] == ["ms-0", "ms-1"]
  for i, r in enumerate(runs):
    assert f"MEGASCALE_SLICE_ID={i}" in r[-1] and "MEGASCALE_NUM_SLICES=2" in r[-1]
    assert "MEGASCALE_COORDINATOR_ADDRESS=$SLICE0_IP:8080" in r[-1]
  assert lines[-1][3:6] == ["queued-resources", "delete", "ms"]


@pytest.mark.parametrize("args,message", [
    (["--name=x", "--zone=z", "--accelerator=v9-8", "create"], "--accelerator='v9-8'"),
    (["--name=x", "--zone=z", "run"], "run needs the training arguments"),
    (["--name=x", "--zone=z", "--accelerator=v5e-3", "create"],
     "--accelerator='v5e-3': 3 chips is not a v5e slice size; known: v5e-1, v5e-4"),
    (["--name=x", "--zone=z", "--accelerator=v5p-12", "create"],
     "12 TensorCores is not a v5p slice size"),
])
def test_tpu_bad_arguments(args, message):
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), "--dry_run", *args],
                       capture_output=True, text=True)
  assert out.returncode == 2 and message in out.stderr


def test_tpu_options_may_follow_the_action():
  lines = _dry("tpu.py", "create", "--name=late", "--zone=z", "--accelerator=v6e-8", "--dry_run")
  assert lines[0][5] == "late" and "--accelerator-type=v6e-8" in lines[0]


def test_slurm_refuses_a_bad_port_and_a_missing_sbatch(tmp_path):
  script = [sys.executable, str(ROOT / "launch" / "slurm.py"), "--nodes=1"]
  out = subprocess.run(script + ["--port=99999", "--", "--workdir=w"], capture_output=True,
                       text=True)
  assert out.returncode == 2 and "--port=99999 must be a TCP port in [1, 65535]" in out.stderr
  env = dict(os.environ, PATH=str(tmp_path))  # no sbatch there
  out = subprocess.run(script + [f"--log_dir={tmp_path / 'logs'}", "--", "--workdir=w"],
                       capture_output=True, text=True, env=env)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip() == ("error: sbatch is not on PATH: run this on a SLURM login node, "
                                "or pass --dry_run to print the script and command")
  assert not (tmp_path / "logs").exists()


def test_local_dry_run_gives_each_process_its_id():
  lines = _dry("local.py", "-n", "3", "--port", "4567", "--dry_run", "--", "--workdir=w")
  assert len(lines) == 3
  for i, line in enumerate(lines):
    env = dict(x.split("=", 1) for x in line if x.startswith(("JAX_", "XLA_")))
    assert env["JAX_PROCESS_ID"] == str(i) and env["JAX_NUM_PROCESSES"] == "3"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert line[-3:] == ["-m", "llm.train", "--workdir=w"]


def _stub(path, body):
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_into_the_distributed_environment(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir / "scontrol", 'printf "gpu-node-7\\ngpu-node-8\\n"\n')
  _stub(bin_dir / "srun", "export SLURM_PROCID=1\nshift\n\"$@\"\n")  # run the task as process 1
  fake_python = tmp_path / "python"
  _stub(fake_python, 'echo "ENV $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID"\n'
                     'for a in "$@"; do echo "ARG $a"; done\n')
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "slurm.py"), "--nodes=2",
                        "--gpus_per_node=4", "--partition=gpu", "--time=1:00:00",
                        f"--python={fake_python}", f"--chdir={tmp_path}", "--dry_run", "--",
                        "--config=configs/tiny.py", "--workdir=/shared/it's here"],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  first, script = out.stdout.split("\n", 1)
  script, submit = script.rsplit("\nsbatch ", 1)
  assert first == "# logs/llm.sbatch" and submit.strip() == "logs/llm.sbatch"
  assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
  assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=1:00:00" in script
  (tmp_path / "job.sbatch").write_text(script)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[7-8]",
             SLURM_NTASKS="2")
  ran = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True,
                       text=True, timeout=60)
  assert ran.returncode == 0, ran.stderr
  assert ran.stdout.splitlines() == ["ENV gpu-node-7:12345 2 1", "ARG -m", "ARG llm.train",
                                     "ARG --config=configs/tiny.py",
                                     "ARG --workdir=/shared/it's here"]
