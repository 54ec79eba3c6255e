"""GPU clusters with SLURM: one JAX process per node over all its GPUs.

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu --time=12:00:00 -- \\
      --config=configs/llama3_8b.py --workdir=/shared/runs/8b
  python launch/slurm.py ... --dry_run -- ...   # print the sbatch script and command only

Writes an sbatch script (beside the logs, in --log_dir) and submits it. In the job,
the first host of the node list is the coordinator; each task exports
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (= SLURM_PROCID), which
llm/distributed.py reads. The workdir must be on storage all nodes share.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
{extra_sbatch}
set -euo pipefail
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads all: no SIGPIPE
export JAX_COORDINATOR_ADDRESS="$COORDINATOR:{port}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
cd {workdir}
TRAIN_ARGS=({train_args})
srun --kill-on-bad-exit=1 bash -c 'export JAX_PROCESS_ID=$SLURM_PROCID; exec "$0" -m {module} "$@"' \\
    {python} "${{TRAIN_ARGS[@]}}"
"""


def render(a, train_args: list[str]) -> str:
  extra = []
  if a.partition:
    extra.append(f"#SBATCH --partition={a.partition}")
  if a.account:
    extra.append(f"#SBATCH --account={a.account}")
  quoted = " ".join(shlex.quote(x) for x in train_args)
  return TEMPLATE.format(job_name=a.job_name, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                         cpus_per_task=a.cpus_per_task, time=a.time, log_dir=a.log_dir,
                         extra_sbatch="\n".join(extra), port=a.port, workdir=shlex.quote(a.chdir),
                         python=shlex.quote(a.python), module=a.module, train_args=quoted)


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_task", type=int, default=32)
  p.add_argument("--time", default="04:00:00")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--job_name", default="llm")
  p.add_argument("--port", type=int, default=12345, help="coordinator port on the first node")
  p.add_argument("--log_dir", default="logs")
  p.add_argument("--chdir", default=str(Path(__file__).resolve().parents[1]),
                 help="checkout the job runs in (default: this one)")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--module", default="llm.train")
  p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                 help="print the script and command only")
  p.epilog = "Training arguments follow --, after all of this launcher's options."
  argv = sys.argv[1:] if argv is None else list(argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  a = p.parse_args(argv[:cut])  # options may come before or after the action
  a.train_args = argv[cut + 1:]
  for name in ("nodes", "gpus_per_node", "cpus_per_task"):
    if getattr(a, name) < 1:
      p.error(f"--{name}={getattr(a, name)} must be >= 1")
  if not 1 <= a.port <= 65535:
    p.error(f"--port={a.port} must be a TCP port in [1, 65535]")
  args = a.train_args
  if not args:
    p.error("give the training arguments after --, e.g. -- --config=... --workdir=...")
  return a, args


def main(argv=None) -> int:
  a, train_args = parse(argv)
  script = render(a, train_args)
  path = Path(a.log_dir) / f"{a.job_name}.sbatch"
  cmd = ["sbatch", str(path)]
  if a.dry_run:
    print(f"# {path}\n{script}\n{shlex.join(cmd)}")
    return 0
  if shutil.which("sbatch") is None:
    print("error: sbatch is not on PATH: run this on a SLURM login node, or pass --dry_run to "
          "print the script and command", file=sys.stderr)
    return 2
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  print(f"wrote {path}", flush=True)
  return subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
