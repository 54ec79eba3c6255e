"""Attention kernel speed: our Pallas flash attention vs jax.nn.dot_product_attention and
JAX's shipped Pallas kernels, forward and forward+backward, causal, bf16.

  python benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384,32768
                                  --tokens 32768 --heads 16 --head_dim 128]
  python benchmarks/attention.py --sweep 4096   # our kernel's launch options at one length

Batch is tokens // length, so every row does the same number of token-rows. Runs on a
GPU or TPU; on a CPU it says so and measures nothing (interpret-mode timings would say
nothing about the kernels). Prints a table and appends it, with the command, to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine, median_seconds  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402


def implementations(platform_name: str, scale: float):
  """name -> f(q_BTHE, k, v) for this platform."""
  impls = {"ours (flash)": lambda q, k, v: flash_attention(q, k, v, causal=True),
           "jax.nn.dot_product_attention (xla)": lambda q, k, v: jax.nn.dot_product_attention(
               q, k, v, is_causal=True, implementation="xla")}
  if platform_name == "gpu":
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    impls["jax.nn.dot_product_attention (cudnn)"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
    impls["jax pallas gpu mha"] = lambda q, k, v: gpu_attention.mha(
        q, k, v, None, sm_scale=scale, causal=True)
  if platform_name == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    impls["jax pallas tpu flash_attention"] = lambda q, k, v: t(tpu_attention.flash_attention(
        t(q), t(k), t(v), causal=True, sm_scale=scale))
  return impls


def _inputs(b, t, h, e):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  return tuple(jax.random.normal(kk, (b, t, h, e), jnp.bfloat16) for kk in ks)


def sweep(args, platform_name):
  """Our kernel at one length over launch options; prints the table, best first."""
  t, h, e = args.sweep, args.heads, args.head_dim
  b = max(1, args.tokens // t)
  q, k, v, do = _inputs(b, t, h, e)
  fwd_flops = 4 * b * t * t * h * e / 2
  blocks = [(bq, bk) for bq in (64, 128) for bk in (32, 64, 128)] if platform_name == "gpu" \
      else [(bq, bk) for bq in (256, 512, 1024) for bk in (256, 512, 1024)]
  launch = [(w, st) for w in (4, 8) for st in (2, 3)] if platform_name == "gpu" else [(None, None)]
  rows = []
  for (bq, bk), (warps, stages) in itertools.product(blocks, launch):
    f = functools.partial(flash_attention, causal=True, block_q=bq, block_k=bk,
                          num_warps=warps, num_stages=stages)
    try:
      t_fwd = median_seconds(jax.jit(f), (q, k, v), args.repeats)
      t_all = median_seconds(jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do)),
                             (q, k, v), args.repeats)
    except Exception as err:  # noqa: BLE001 (shared memory exceeded): say so
      print(f"block {bq}x{bk} warps {warps} stages {stages}: {type(err).__name__}: "
            f"{str(err)[:80]}")
      continue
    rows.append((t_all, t_fwd, bq, bk, warps, stages))
  table = ["| block_q | block_k | num_warps | num_stages | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
           "fwd+bwd TFLOP/s |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for t_all, t_fwd, bq, bk, warps, stages in sorted(rows):
    table.append(f"| {bq} | {bk} | {warps} | {stages} | {1e3 * t_fwd:.2f} | "
                 f"{fwd_flops / t_fwd / 1e12:.1f} | {1e3 * t_all:.2f} | "
                 f"{3.5 * fwd_flops / t_all / 1e12:.1f} |")
  print("\n".join(table))
  if not args.no_append:
    append_result("attention launch options", f"{machine()}; ours, causal, bf16, length {t}, "
                  f"batch {b}, {h} heads x {e}; fastest forward+backward first", "\n".join(table))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  p.add_argument("--tokens", type=int, default=32768)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--sweep", type=int, default=0, metavar="LENGTH",
                 help="instead: time our kernel over block sizes and (GPU) warps/stages")
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  platform_name = jax.default_backend()
  if platform_name not in ("gpu", "tpu"):
    print(f"benchmarks/attention.py: no GPU or TPU here (JAX backend: {platform_name}); the "
          "kernels only run interpreted on a CPU, so nothing is measured. Run it on a GPU/TPU "
          "machine.")
    return
  h, e = args.heads, args.head_dim
  scale = e ** -0.5
  if args.sweep:
    return sweep(args, platform_name)
  impls = implementations(platform_name, scale)
  rows = []
  for t in [int(x) for x in args.lengths.split(",")]:
    b = max(1, args.tokens // t)
    q, k, v, do = _inputs(b, t, h, e)
    fwd_flops = 4 * b * t * t * h * e / 2  # causal: half the score matrix
    for name, f in impls.items():
      fwd = jax.jit(f)
      fwd_bwd = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do))
      try:
        t_fwd = median_seconds(fwd, (q, k, v), args.repeats)
        t_all = median_seconds(fwd_bwd, (q, k, v), args.repeats)
        rows.append((t, b, name, 1e3 * t_fwd, fwd_flops / t_fwd / 1e12, 1e3 * t_all,
                     3.5 * fwd_flops / t_all / 1e12))
      except Exception as err:  # noqa: BLE001 (out of memory, unsupported shape): say so
        rows.append((t, b, name, None, None, None, f"{type(err).__name__}: {str(err)[:60]}"))
  table = ["| length | batch | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
           "|-------:|------:|----------------|-------:|------------:|-----------:|----------------:|"]
  for t, b, name, f_ms, f_tf, a_ms, a_tf in rows:
    if f_ms is None:
      table.append(f"| {t} | {b} | {name} | – | – | – | {a_tf} |")
    else:
      table.append(f"| {t} | {b} | {name} | {f_ms:.2f} | {f_tf:.1f} | {a_ms:.2f} | {a_tf:.1f} |")
  print("\n".join(table))
  if not args.no_append:
    append_result("attention", f"{machine()}; causal, bf16, {h} heads x {e}, {args.tokens} tokens "
                  "per call; FLOPs count the causal half (fwd 2 matmuls, fwd+bwd 3.5x fwd)",
                  "\n".join(table))


if __name__ == "__main__":
  main()
