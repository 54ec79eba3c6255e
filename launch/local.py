"""Run N processes of one program on this machine as a multi-process JAX job.

  python launch/local.py -n 2 -- --config=configs/tiny.py --workdir=runs/mp
  python launch/local.py -n 2 --module llm.evaluate -- --workdir=runs/mp

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
llm/distributed.py), JAX_PLATFORMS=cpu and --devices_per_process fake CPU devices, so a
laptop exercises the same multi-controller code paths as a TPU pod or GPU cluster.
Output lines are prefixed with [p<id>]. SIGTERM/SIGINT are forwarded to every process;
if one fails, the rest are stopped and its exit code is returned.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, n: int, i: int, port: int, devices_per_process: int) -> dict:
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
             PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  return env


def _pump(stream, prefix: str):
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("-n", "--num_processes", type=int, required=True)
  p.add_argument("--devices_per_process", type=int, default=2)
  p.add_argument("--module", default="llm.train", help="python -m MODULE runs in each process")
  p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  p.add_argument("--grace_seconds", type=float, default=10.0,
                 help="after one process fails, how long the others get to stop before SIGKILL")
  p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                 help="print the commands and exit")
  p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's arguments")
  a = p.parse_args(argv)
  if a.num_processes < 1 or a.devices_per_process < 1:
    p.error(f"-n={a.num_processes} and --devices_per_process={a.devices_per_process} must be >= 1")
  args = a.args[1:] if a.args[:1] == ["--"] else a.args
  port = a.port or free_port()
  cmd = [sys.executable, "-m", a.module, *args]
  envs = [process_env(os.environ, a.num_processes, i, port, a.devices_per_process)
          for i in range(a.num_processes)]
  if a.dry_run:
    for i, env in enumerate(envs):
      keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS",
              "XLA_FLAGS")
      print(" ".join(f"{k}={shlex.quote(env[k])}" for k in keys) + " " + shlex.join(cmd))
    return 0
  procs = [subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
           for env in envs]
  pumps = [threading.Thread(target=_pump, args=(pr.stdout, f"[p{i}]"), daemon=True)
           for i, pr in enumerate(procs)]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    del frame
    for pr in procs:
      if pr.poll() is None:
        pr.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  code = 0
  kill_at = None  # when the others get SIGKILL after one failed
  remaining = set(range(len(procs)))
  while remaining:
    for i in list(remaining):
      try:
        rc = procs[i].wait(timeout=0.2)
      except subprocess.TimeoutExpired:
        continue
      remaining.discard(i)
      if rc != 0 and code == 0:
        # A lost process leaves the others blocked in collectives until JAX's heartbeat
        # gives up (minutes): ask them to stop, then kill what is left after a grace period.
        code = rc if rc > 0 else 128 - rc
        print(f"[launch] process {i} exited with {rc}; stopping the others (SIGTERM, then "
              f"SIGKILL after {a.grace_seconds:g}s)", flush=True)
        for j in remaining:
          procs[j].terminate()
        kill_at = time.monotonic() + a.grace_seconds
    if kill_at is not None and time.monotonic() > kill_at:
      for j in remaining:
        if procs[j].poll() is None:
          print(f"[launch] process {j} still running: SIGKILL", flush=True)
          procs[j].kill()
      kill_at = None
  for t in pumps:
    t.join(timeout=5)
  return code


if __name__ == "__main__":
  sys.exit(main())
