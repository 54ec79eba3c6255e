"""Training throughput: tokens/s, achieved GFLOP/s and MFU of the real train step.

  python benchmarks/train_throughput.py [--steps 20 --d_model 256 --n_layers 2 --vocab 32000
                                         --seq_len 256 --batch 4 --dtype float32 --remat none]

MFU is measured against the best matmul throughput measured in the same run on
the same device (on a CPU there is no datasheet peak). Prints a table and
appends it, with the exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine  # noqa: E402
from llm.config import base_config, validate  # noqa: E402
from llm.flops import flops_per_token  # noqa: E402
from llm.hardware import measure_matmul_flops  # noqa: E402
from llm.model import make_model  # noqa: E402
from llm.model.layers import DTYPES  # noqa: E402
from llm.model.transformer import REMAT_POLICIES  # noqa: E402
from llm.parallel.mesh import make_mesh, use_mesh  # noqa: E402
from llm.parallel.rules import batch_sharding as make_batch_sharding  # noqa: E402
from llm.training.optim import make_optimizer  # noqa: E402
from llm.training.state import init_state, state_shardings  # noqa: E402
from llm.training.step import BATCH_KEYS, jit_train_step  # noqa: E402


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--n_layers", type=int, default=2)
  p.add_argument("--n_heads", type=int, default=4)
  p.add_argument("--d_ff", type=int, default=768)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--dtype", default="float32", choices=list(DTYPES))
  p.add_argument("--remat", default="none", choices=list(REMAT_POLICIES))
  p.add_argument("--no_append", action="store_true", help="do not append to BENCHMARKS.md")
  return p.parse_args()


def main():
  args = parse()
  cfg = base_config()
  cfg.model.update(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                   n_heads=args.n_heads, n_kv_heads=args.n_heads, d_ff=args.d_ff,
                   dtype=args.dtype, remat=args.remat)
  cfg.data.seq_len = args.seq_len
  cfg.train.update(batch_size=args.batch, steps=args.steps + args.warmup)
  cfg.optim.warmup_steps = 1
  cfg.mesh.update(data=-1)
  validate(cfg)

  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  model = make_model(cfg.model)
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  abstract, shardings = state_shardings(model, tx, args.seq_len, mesh)
  state = init_state(model, tx, args.seq_len, 0, shardings)
  batch_sharding = make_batch_sharding(mesh)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq_len)
  batch = {"inputs": rng.integers(0, args.vocab, shape), "targets": rng.integers(0, args.vocab, shape),
           "segment_ids": np.ones(shape), "positions": np.broadcast_to(np.arange(args.seq_len), shape),
           "loss_mask": np.ones(shape)}
  batch = {k: jax.device_put(np.asarray(batch[k], np.float32 if k == "loss_mask" else np.int32),
                             batch_sharding) for k in BATCH_KEYS}

  step_fn = jit_train_step(cfg, model, tx, shardings, batch_sharding)
  t0 = time.perf_counter()
  with use_mesh(mesh):
    compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()

  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))

  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  tokens = args.batch * args.seq_len
  flops = flops_per_token(cfg.model, args.seq_len) * tokens
  peak = measure_matmul_flops(dtype=jnp.dtype(args.dtype))
  rows = [
      ("params", f"{n_params:,}"),
      ("tokens/step", f"{tokens:,}"),
      ("step time (median)", f"{step_s * 1e3:.1f} ms"),
      ("tokens/s", f"{tokens / step_s:,.0f}"),
      ("model GFLOP/step", f"{flops / 1e9:.2f}"),
      ("achieved GFLOP/s", f"{flops / step_s / 1e9:.1f}"),
      ("measured matmul peak GFLOP/s", f"{peak / 1e9:.1f}"),
      ("MFU", f"{100 * flops / step_s / peak:.1f}%"),
      ("compile", f"{compile_s:.2f} s"),
      ("memory: arguments", f"{mem.argument_size_in_bytes / 2**20:.1f} MiB"),
      ("memory: outputs", f"{mem.output_size_in_bytes / 2**20:.1f} MiB"),
      ("memory: temporaries", f"{mem.temp_size_in_bytes / 2**20:.1f} MiB"),
      ("memory: aliased (donated)", f"{mem.alias_size_in_bytes / 2**20:.1f} MiB"),
  ]
  width = max(len(k) for k, _ in rows)
  table = "\n".join([f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"] +
                    [f"| {k:<{width}} | {v} |" for k, v in rows])
  print(table)
  if not args.no_append:
    append_result("train_throughput", f"{machine()}; d_model {args.d_model}, {args.n_layers} "
                  f"layers, vocab {args.vocab}, seq {args.seq_len}, batch {args.batch}, "
                  f"{args.dtype}, remat {args.remat}, {args.steps} timed steps", table)


if __name__ == "__main__":
  main()
