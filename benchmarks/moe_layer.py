"""One MoE layer, forward + backward: dropless grouped matmul (ragged_dot) vs capacity
einsum dispatch vs a dense SwiGLU of the same active FLOPs (top_k x expert width), in one run.

  python benchmarks/moe_layer.py [--tokens 4096 --d_model 512 --d_ff 1024 --experts 8 --top_k 2
                                  --capacity_factor 1.25 --steps 10 --dtype float32]

Prints tokens/s and the ratio to the dense layer, and appends the table with the command to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine, median_seconds  # noqa: E402
from llm.model.moe import route  # noqa: E402
from llm.ops.moe import capacity, dropless  # noqa: E402


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=1024, help="each expert's width")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute dtype (weights stay float32, as in training)")
  p.add_argument("--no_append", action="store_true")
  return p.parse_args()


def main():
  a = parse()
  ks = jax.random.split(jax.random.key(0), 6)
  n, d, f, e, k = a.tokens, a.d_model, a.d_ff, a.experts, a.top_k
  dtype = jnp.dtype(a.dtype)
  x = jax.random.normal(ks[0], (n, d))
  router = 0.1 * jax.random.normal(ks[1], (d, e))
  gate, up = (0.05 * jax.random.normal(kk, (e, d, f)) for kk in ks[2:4])
  down = 0.05 * jax.random.normal(ks[4], (e, f, d))
  dense = [0.05 * jax.random.normal(kk, shape) for kk, shape in
           zip(jax.random.split(ks[5], 3), [(d, k * f), (d, k * f), (k * f, d)])]

  def moe_loss(compute, **kw):
    def loss(x, gate, up, down):
      _, _, w, ex = route(x, router, k, True)
      return jnp.sum(compute(x, w, ex, gate, up, down, dtype, **kw)[0].astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  def dense_loss(x, g, u, dn):
    x, g, u, dn = (v.astype(dtype) for v in (x, g, u, dn))
    return jnp.sum(((jax.nn.silu(x @ g) * (x @ u) @ dn).astype(jnp.float32)) ** 2)

  dense_fn = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1, 2, 3)))
  rows = [("dense SwiGLU, width top_k x d_ff", median_seconds(dense_fn, (x, *dense), a.steps)),
          ("dropless (ragged_dot)", median_seconds(moe_loss(dropless), (x, gate, up, down),
                                                   a.steps)),
          (f"capacity einsum (factor {a.capacity_factor:g})",
           median_seconds(moe_loss(capacity, capacity_factor=a.capacity_factor),
                          (x, gate, up, down), a.steps))]
  base = rows[0][1]
  flops = 3 * 2 * n * k * 3 * d * f  # active expert FLOPs, forward + backward
  table = "\n".join(["| layer (forward + backward) | ms | tokens/s | active TFLOP/s | vs dense |",
                     "|---|---:|---:|---:|---:|"] +
                    [f"| {name} | {t * 1e3:.2f} | {n / t:,.0f} | {flops / t / 1e12:.2f} | "
                     f"{base / t:.2f}x |" for name, t in rows])
  print(table)
  if not a.no_append:
    append_result("moe_layer", f"{machine()}; {n} tokens, d_model {d}, {e} experts of width {f}, "
                  f"top {k}, {a.dtype} compute, median of {a.steps}", table)


if __name__ == "__main__":
  main()
