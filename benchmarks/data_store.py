"""The token store at scale (issue #15): build speed, memory, and time to the first step.

  python benchmarks/data_store.py [--gb 1.0 --small_gb 0.1 --workers 1,2 --dir /tmp/llm-store-bench]

Generates a JSONL corpus of `--gb` GB of text from the Python standard library and
Shakespeare with perturbations (each document a source file or a play with 3% of its
words replaced by others of the same document and a random tenth of its lines dropped,
so no two are alike), in files of 64 MB; the first files make the `--small_gb` corpus.
It then reports, each prepare a fresh `python -m llm.data.prepare` process:

* build throughput (tokens/s) of the full corpus with each of `--workers` worker counts;
* peak resident memory (RSS) of prepare for the small and the full corpus (the sum over
  the driver and its Beam worker processes, sampled every 0.2 s, and the largest single
  process), and of training (`python -m llm.train`, 20 steps of the tiny model) from each
  store;
* the time from starting `python -m llm.train` to its first step, from the store and from
  the in-memory path (data.source=jsonl) with its token cache already built, on the small
  corpus, and the time that in-memory path takes to build its cache.

Prints a table and appends it, with the exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result  # noqa: E402
from llm.data import sources  # noqa: E402

FILE_BYTES = 64 << 20


def base_texts() -> list[str]:
  texts = []
  for f in sources.stdlib_files():
    try:
      texts.append(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError):
      continue
  texts += [f.read_text(encoding="utf-8") for f in sources.shakespeare_files()]
  return [t for t in texts if len(t) > 200]


def perturb(text: str, rng) -> str:
  lines = text.split("\n")
  keep = rng.random(len(lines)) > 0.1
  lines = [line for line, k in zip(lines, keep) if k]
  words = re.split(r"(\s+)", "\n".join(lines))
  idx = np.flatnonzero(rng.random(len(words)) < 0.03)
  pool = words[::2]
  for i in idx:
    if i % 2 == 0:
      words[i] = pool[rng.integers(len(pool))]
  return "".join(words)


def make_corpus(out: Path, gb: float, seed: int = 0) -> list[Path]:
  """JSONL files of perturbed documents, FILE_BYTES each, until `gb` GB; kept between runs."""
  out.mkdir(parents=True, exist_ok=True)
  want = int(gb * (1 << 30))
  files = sorted(out.glob("part-*.jsonl"))
  have = sum(f.stat().st_size for f in files)
  if have >= want:
    total, chosen = 0, []
    for f in files:
      if total >= want:
        break
      chosen.append(f)
      total += f.stat().st_size
    return chosen
  texts = base_texts()
  rng = np.random.default_rng(seed + len(files))
  print(f"generating {(want - have) / 2**30:.2f} GB of text into {out}", flush=True)
  while have < want:
    path = out / f"part-{len(files):05d}.jsonl"
    tmp = path.with_suffix(".tmp")
    size = 0
    with open(tmp, "w", encoding="utf-8") as fh:
      while size < FILE_BYTES:
        line = json.dumps({"text": perturb(texts[rng.integers(len(texts))], rng)}) + "\n"
        fh.write(line)
        size += len(line.encode())
    os.replace(tmp, path)
    files.append(path)
    have += size
  return make_corpus(out, gb, seed)


def _tree_rss(pid: int) -> tuple[int, int]:
  """(sum, max) RSS in bytes over a process and its descendants."""
  pids, total, largest = [pid], 0, 0
  while pids:
    p = pids.pop()
    try:
      status = Path(f"/proc/{p}/status").read_text()
      rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
      for task in Path(f"/proc/{p}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, AttributeError):
      continue
    total += rss
    largest = max(largest, rss)
  return total, largest


def run_measured(cmd: list[str], first_line: str | None = None) -> dict:
  """Runs cmd; returns seconds, peak tree RSS (sum and largest process), the seconds until a
  stdout line starting with `first_line` appeared, and the output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT)
  peak = [0, 0]
  done = threading.Event()

  def sample():
    while not done.wait(0.2):
      total, largest = _tree_rss(proc.pid)
      peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  out, first = [], None
  for line in proc.stdout:
    out.append(line)
    if first is None and first_line and line.startswith(first_line):
      first = time.time() - t0
  proc.wait()
  done.set()
  thread.join()
  text = "".join(out)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
  return {"seconds": time.time() - t0, "rss_sum": peak[0], "rss_max": peak[1],
          "first": first, "output": text}


CONFIG = """
from llm.config import load_config

def get_config():
  c = load_config("tiny", check=False)
  c.model.vocab_size = {vocab}
  c.data.update(source="jsonl", paths={paths!r}, tokenizer_path={tok!r}, seq_len=256,
                store_shards={shards}, tokenizer_max_chars=20_000_000, val_fraction=0.01)
  c.train.update(steps=20, log_every=1, eval_every=1000, checkpoint_every=1000)
  c.optim.update(warmup_steps=2)
  return c
"""


def write_config(dir_: Path, name: str, files: list[Path], tok: str, vocab: int,
                 shards: int) -> Path:
  path = dir_ / f"{name}.py"
  path.write_text(CONFIG.format(paths=",".join(map(str, files)), tok=tok, vocab=vocab,
                                shards=shards))
  return path


def prepare_cmd(config: Path, output: Path, workers: int) -> list[str]:
  return [sys.executable, "-m", "llm.data.prepare", f"--config={config}", f"--output={output}",
          f"--direct_num_workers={workers}"]


def train_cmd(config: Path, workdir: Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "llm.train", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def tokens_of(output: str) -> int:
  m = re.search(r"val rows, ([\d,]+) tokens", output)
  return int(m.group(1).replace(",", ""))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--gb", type=float, default=1.0)
  p.add_argument("--small_gb", type=float, default=0.1)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--dir", default="/tmp/llm-store-bench")
  p.add_argument("--no_in_memory", action="store_true",
                 help="skip the in-memory path's time to the first step")
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  d = Path(args.dir)
  big = make_corpus(d / "corpus", args.gb)
  small = make_corpus(d / "corpus", args.small_gb)
  size = {"small": sum(f.stat().st_size for f in small), "full": sum(f.stat().st_size for f in big)}
  rows, results = [], {}
  mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731

  # one tokenizer for every build (trained by the first, from a sample of the small corpus)
  tok = d / "tokenizer.model"
  cfg_small = write_config(d, "small", small, "", args.vocab, len(small))
  if not tok.is_file():
    r = run_measured(prepare_cmd(cfg_small, d / "store-tok", 2))
    (d / "store-tok" / "tokenizer.model").replace(tok)
  cfg_small = write_config(d, "small", small, str(tok), args.vocab, len(small))
  cfg_big = write_config(d, "full", big, str(tok), args.vocab, len(big))

  for workers in [int(w) for w in args.workers.split(",")]:
    out = d / f"store-full-{workers}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    r = run_measured(prepare_cmd(cfg_big, out, workers))
    n = tokens_of(r["output"])
    rows.append((f"prepare {size['full'] / 2**30:.2f} GB, {workers} worker(s)",
                 f"{r['seconds']:,.0f} s", f"{n / r['seconds']:,.0f} tokens/s",
                 f"{mib(r['rss_sum'])} (largest process {mib(r['rss_max'])})"))
    results[f"full-{workers}"] = (r, n)
    print(rows[-1], flush=True)
  out_small = d / "store-small"
  subprocess.run(["rm", "-rf", str(out_small)], check=True)
  r = run_measured(prepare_cmd(cfg_small, out_small, max(int(w) for w in args.workers.split(","))))
  n = tokens_of(r["output"])
  rows.append((f"prepare {size['small'] / 2**30:.2f} GB, "
               f"{max(int(w) for w in args.workers.split(','))} worker(s)",
               f"{r['seconds']:,.0f} s", f"{n / r['seconds']:,.0f} tokens/s",
               f"{mib(r['rss_sum'])} (largest process {mib(r['rss_max'])})"))
  print(rows[-1], flush=True)

  full_store = d / f"store-full-{max(int(w) for w in args.workers.split(','))}"
  for name, store_dir, cfg in (("small", out_small, cfg_small), ("full", full_store, cfg_big)):
    wd = d / f"train-store-{name}"
    subprocess.run(["rm", "-rf", str(wd)], check=True)
    r = run_measured(train_cmd(cfg, wd, f"--config.data.store={store_dir}",
                               "--config.data.tokenizer_path="), first_line="step 1/")
    rows.append((f"train 20 steps from the {size[name] / 2**30:.2f} GB store",
                 f"first step after {r['first']:,.1f} s", "", f"{mib(r['rss_sum'])}"))
    print(rows[-1], flush=True)
  if not args.no_in_memory:
    wd = d / "train-memory-small"
    subprocess.run(["rm", "-rf", str(wd)], check=True)
    r = run_measured(train_cmd(cfg_small, wd), first_line="step 1/")
    rows.append((f"train from the in-memory path, {size['small'] / 2**30:.2f} GB, cache cold",
                 f"first step after {r['first']:,.1f} s", "", f"{mib(r['rss_sum'])}"))
    print(rows[-1], flush=True)
    subprocess.run(["rm", "-rf", str(wd / "checkpoints")], check=True)
    r = run_measured(train_cmd(cfg_small, wd), first_line="step 1/")
    rows.append((f"train from the in-memory path, {size['small'] / 2**30:.2f} GB, cache warm",
                 f"first step after {r['first']:,.1f} s", "", f"{mib(r['rss_sum'])}"))
    print(rows[-1], flush=True)

  body = "| what | time | throughput | peak RSS |\n|---|---|---|---|\n" + "\n".join(
      f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows)
  print(body)
  if not args.no_append:
    append_result(
        "Token store: build throughput, memory, time to the first step",
        f"{os.cpu_count()} CPU cores. JSONL corpus generated from the Python standard library "
        f"and Shakespeare with perturbations ({size['full'] / 2**30:.2f} GB; its first "
        f"{len(small)} files make the {size['small'] / 2**30:.2f} GB one); sentencepiece BPE "
        f"vocabulary {args.vocab}, rows of 256 tokens, one shard per 64 MB file, no curation "
        "stages; Beam DirectRunner, multi_processing. Peak RSS sums the driver and its Beam "
        "worker processes. Training: the tiny recipe, 20 steps.", body)


if __name__ == "__main__":
  main()
