"""Small configs and corpora shared by tests (importable by subprocesses too)."""

import json
import sysconfig
from pathlib import Path

import ml_collections

from llm.config import base_config

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A small real corpus that needs no download: a few standard-library modules.
CORPUS_FILES = ["textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                "string.py", "colorsys.py", "keyword.py", "this.py", "stat.py", "calendar.py",
                "pprint.py", "queue.py", "sched.py", "numbers.py"]


def tiny_config(**mesh) -> ml_collections.ConfigDict:
  """A 2-layer model on a stdlib text corpus; trains a step in milliseconds."""
  c = base_config()
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 remat="none")
  c.data.update(source="text", paths=",".join(str(STDLIB / f) for f in CORPUS_FILES),
                doc_separator=r"\n\s*\n", seq_len=32, val_fraction=0.1)
  c.train.update(batch_size=8, steps=8, log_every=1, eval_every=4, eval_batches=2,
                 checkpoint_every=4, async_checkpointing=True, peak_flops_per_device=1e9)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.mesh.update({**dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh})
  return c


def load_recipe(name: str) -> ml_collections.ConfigDict:
  """configs/NAME.py's get_config(), not validated."""
  from llm.config import load_config
  return load_config(str(ROOT / "configs" / f"{name}.py"), check=False)


def losses(workdir) -> dict[int, float]:
  """Training loss per step from metrics.jsonl, the last record of each step (a resumed
  run re-logs the steps after its checkpoint)."""
  out = {}
  for line in open(Path(workdir) / "metrics.jsonl"):
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out
