"""Cloud TPU VM slices: create, install, run the same command on every worker, stream
logs, delete. Multislice (several slices over DCN) through queued resources.

  python launch/tpu.py --name=llm-v5e --zone=us-west4-a --accelerator=v5e-16 all -- \\
      --config=configs/llama2_7b.py --workdir=gs://BUCKET/runs/7b
  python launch/tpu.py --name=llm-v5e --zone=us-west4-a --accelerator=v5e-16 --num_slices=2 \\
      create
  python launch/tpu.py ... --dry_run all -- ...    # print the exact gcloud commands only

Actions: create | setup | run | logs | delete | all (create, setup, run, delete).
setup copies this checkout (git archive of HEAD) to every worker and installs it with
the tpu extra; run starts `python -m llm.train ARGS` on all workers at once (JAX finds
its peers through the TPU metadata; LLM_MULTIHOST=1 tells llm/distributed.py to join)
and streams their output; multislice runs also export the MEGASCALE_* variables that
connect slices. The workdir must be storage every worker sees (gs://...).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llm.hardware import TPU_GENERATIONS, slice_grid  # noqa: E402 (tables only; no JAX needed)

ACTIONS = ("create", "setup", "run", "logs", "delete", "all")
TARBALL = "/tmp/llm-src.tar.gz"
REMOTE_DIR = "~/llm"
LOG = "~/llm-train.log"
MEGASCALE_PORT = 8080
COORDINATOR = "SLICE0_IP"  # placeholder for slice 0 worker 0's IP, looked up at run time


def accelerator_type(name: str) -> tuple[str, str]:
  """'v5e-16' -> ('v5litepod-16', 'v5e')."""
  gen, _, size = name.partition("-")
  if gen not in TPU_GENERATIONS or not size.isdigit():
    raise ValueError(f"--accelerator={name!r}: expected GEN-SIZE with GEN in "
                     f"{sorted(TPU_GENERATIONS)}, e.g. v5e-16, v6e-64, v5p-128, v4-32")
  slice_grid(gen, int(size), f"--accelerator={name!r}")  # a size Cloud TPU has (as llm.plan)
  return f"{TPU_GENERATIONS[gen].accelerator}-{size}", gen


def _gcloud_base(a) -> list[str]:
  return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def node_names(a) -> list[str]:
  return [a.name] if a.num_slices == 1 else [f"{a.name}-{i}" for i in range(a.num_slices)]


def create(a) -> list[list[str]]:
  acc, gen = accelerator_type(a.accelerator)
  version = a.runtime_version or TPU_GENERATIONS[gen].runtime
  spot = ["--spot"] if a.spot else []
  if a.num_slices == 1:
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_gcloud_base(a),
             f"--accelerator-type={acc}", f"--version={version}", *spot]]
  return [["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *_gcloud_base(a),
           f"--accelerator-type={acc}", f"--runtime-version={version}",
           f"--node-count={a.num_slices}", f"--node-prefix={a.name}", *spot]]


def _ssh(a, node: str, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_gcloud_base(a), "--worker=all",
          f"--command={command}"]


def setup(a) -> list[list[str]]:
  cmds = [["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={TARBALL}", "HEAD"]]
  install = (f"mkdir -p {REMOTE_DIR} && tar xzf ~/llm-src.tar.gz -C {REMOTE_DIR} && "
             f'cd {REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu]"')
  for node in node_names(a):
    cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL, f"{node}:~/llm-src.tar.gz",
                 *_gcloud_base(a), "--worker=all"])
    cmds.append(_ssh(a, node, install))
  return cmds


def coordinator_query(a) -> list[str]:
  """Prints the internal IP of slice 0's worker 0, the multislice coordinator."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", node_names(a)[0], *_gcloud_base(a),
          "--format=value(networkEndpoints[0].ipAddress)"]


def run(a, train_args: list[str]) -> list[list[str]]:
  cmds = []
  nodes = node_names(a)
  for i, node in enumerate(nodes):
    env = ["LLM_MULTIHOST=1"]
    if a.num_slices > 1:
      env += [f"MEGASCALE_COORDINATOR_ADDRESS=${COORDINATOR}:{MEGASCALE_PORT}",
              f"MEGASCALE_NUM_SLICES={a.num_slices}", f"MEGASCALE_SLICE_ID={i}",
              "MEGASCALE_PORT=" + str(MEGASCALE_PORT)]
    train = shlex.join([".venv/bin/python", "-m", a.module, *train_args])
    cmds.append(_ssh(a, node, f"cd {REMOTE_DIR} && {' '.join(env)} {train} 2>&1 | tee -a {LOG}"))
  return cmds


def logs(a) -> list[list[str]]:
  return [_ssh(a, node, f"tail -n 200 -F {LOG}") for node in node_names(a)]


def delete(a) -> list[list[str]]:
  if a.num_slices == 1:
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_gcloud_base(a), "--quiet"]]
  return [["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, *_gcloud_base(a),
           "--force", "--quiet"]]


def commands(a, train_args: list[str]) -> list[list[str]]:
  plan = {"create": lambda: create(a), "setup": lambda: setup(a),
          "run": lambda: run(a, train_args), "logs": lambda: logs(a), "delete": lambda: delete(a)}
  if a.action == "all":
    return create(a) + setup(a) + run(a, train_args) + delete(a)
  return plan[a.action]()


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("action", choices=ACTIONS)
  p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--accelerator", default="v5e-16", help="slice, e.g. v5e-16, v5p-128")
  p.add_argument("--project", default="")
  p.add_argument("--runtime_version", default="", help="default: the generation's base image")
  p.add_argument("--num_slices", type=int, default=1, help=">1: multislice via queued resources")
  p.add_argument("--spot", action="store_true")
  p.add_argument("--module", default="llm.train")
  p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                 help="print the commands, run nothing")
  p.epilog = "Training arguments follow --, after all of this launcher's options."
  argv = sys.argv[1:] if argv is None else list(argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  a = p.parse_args(argv[:cut])  # options may come before or after the action
  a.train_args = argv[cut + 1:]
  if a.num_slices < 1:
    p.error(f"--num_slices={a.num_slices} must be >= 1")
  try:
    accelerator_type(a.accelerator)
  except ValueError as err:
    p.error(str(err))
  args = a.train_args
  if a.action in ("run", "all") and not args:
    p.error(f"{a.action} needs the training arguments after --, e.g. -- --config=... "
            "--workdir=gs://...")
  return a, args


def main(argv=None) -> int:
  a, train_args = parse(argv)
  if a.num_slices > 1 and a.action in ("run", "all"):
    print(f"{COORDINATOR}=$({shlex.join(coordinator_query(a))})", flush=True)
  coordinator = None  # looked up just before the first command that needs it
  for cmd in commands(a, train_args):
    if not a.dry_run and any(f"${COORDINATOR}" in c for c in cmd):
      if coordinator is None:
        coordinator = subprocess.check_output(coordinator_query(a), text=True).strip()
      cmd = [c.replace(f"${COORDINATOR}", coordinator) for c in cmd]
    print(shlex.join(cmd), flush=True)
    if not a.dry_run:
      rc = subprocess.call(cmd)
      if rc != 0:
        print(f"[launch] failed ({rc}): {shlex.join(cmd)}", file=sys.stderr)
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
