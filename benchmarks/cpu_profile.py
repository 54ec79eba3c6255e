"""Where a CPU train step's time goes (issue #17), against the peers in the same run.

  python benchmarks/cpu_profile.py [--repeats 7 --no_append]

On the issue's 18M model (vocab 32000 untied, d_model 256, 2 layers, 4 heads, d_ff 768,
seq 256, batch 4, fp32, no remat) it times: the forward + loss and value_and_grad of
the objective; the unembedding + cross-entropy alone, whole (autodiff) and fused in chunks
(llm.ops.cross_entropy.fused_loss, which never holds all the logits); our attention against
jax.nn.dot_product_attention; one layer (from 2- vs 6-layer models); and matmuls of the
step's shapes in XLA against torch (2 threads), if torch is installed. Prints a table
and appends it, with the exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine, median_seconds  # noqa: E402
from llm.config import base_config  # noqa: E402
from llm.model import init_params, make_model, unbox  # noqa: E402
from llm.ops.attention.xla import xla_attention  # noqa: E402
from llm.ops.cross_entropy import fused_loss, token_nll  # noqa: E402
from llm.objectives.pretrain import next_token  # noqa: E402


def model_and_batch(n_layers: int, vocab: int):
  cfg = base_config()
  cfg.model.update(vocab_size=vocab, d_model=256, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                   d_ff=768, remat="none")
  cfg.data.seq_len = 256
  model = make_model(cfg.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  rng = np.random.default_rng(0)
  shape = (4, 256)
  batch = {"inputs": jnp.asarray(rng.integers(0, vocab, shape), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, vocab, shape), jnp.int32),
           "segment_ids": jnp.ones(shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(256), shape).astype(jnp.int32),
           "loss_mask": jnp.ones(shape)}
  frozen = ml_collections.FrozenConfigDict(cfg)
  return (lambda p, b: next_token(p, b, model=model, config=frozen)[0]), params, batch


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--no_append", action="store_true", help="do not append to BENCHMARKS.md")
  args = p.parse_args()
  ms = lambda fn, *a: median_seconds(fn, a, args.repeats) * 1e3  # noqa: E731
  rows = []

  loss, params, batch = model_and_batch(2, 32000)
  rows.append(("18M model: forward + loss", ms(jax.jit(loss), params, batch)))
  rows.append(("18M model: value_and_grad", ms(jax.jit(jax.value_and_grad(loss)),
                                               params, batch)))
  x = jax.random.normal(jax.random.key(0), (1024, 256)) * 0.5
  w = params["unembed"]
  t = batch["targets"].reshape(-1)
  whole = lambda x, w, t: jnp.sum(token_nll(x @ w, t)[0])  # noqa: E731
  rows.append(("unembed + CE fwd+bwd, whole logits",
               ms(jax.jit(jax.grad(whole, argnums=(0, 1))), x, w, t)))
  x_BTD, t_BT, mask_BT = x.reshape(4, 256, 256), t.reshape(4, 256), jnp.ones((4, 256))
  for chunk in (32, 128, 0):
    fused = lambda x, w, c=chunk: fused_loss(x, w, t_BT, mask_BT, chunk_len=c)[0]  # noqa: E731
    rows.append((f"unembed + CE fwd+bwd, fused, {chunk or 256} positions x 4 rows per chunk",
                 ms(jax.jit(jax.grad(fused, argnums=(0, 1))), x_BTD, w)))

  q, k, v = (jax.random.normal(jax.random.key(i), (4, 256, 4, 64)) for i in range(3))
  seg = jnp.ones((4, 256), jnp.int32)
  ours = lambda q, k, v: jnp.sum(xla_attention(q, k, v, seg))  # noqa: E731
  peer = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True))  # noqa
  rows.append(("attention fwd+bwd [4,256,4,64], ours (xla)",
               ms(jax.jit(jax.grad(ours, argnums=(0, 1, 2))), q, k, v)))
  rows.append(("attention fwd+bwd, jax.nn.dot_product_attention",
               ms(jax.jit(jax.grad(peer, argnums=(0, 1, 2))), q, k, v)))

  per_layer = {}
  for n in (2, 6):
    loss, params, batch = model_and_batch(n, 512)
    per_layer[n] = (ms(jax.jit(loss), params, batch),
                    ms(jax.jit(jax.value_and_grad(loss)), params, batch))
  rows.append(("one layer, forward (6- minus 2-layer, vocab 512) / 4",
               (per_layer[6][0] - per_layer[2][0]) / 4))
  rows.append(("one layer, forward + backward", (per_layer[6][1] - per_layer[2][1]) / 4))

  shapes = [(1024, 256, 32000), (1024, 256, 768), (1024, 32000, 256)]
  try:
    import torch
    torch.set_num_threads(2)
  except ImportError:
    torch = None
  for m, kk, n in shapes:
    a, b = jnp.ones((m, kk)), jnp.ones((kk, n))
    flop = 2 * m * kk * n
    xla = flop / (ms(jax.jit(jnp.matmul), a, b) / 1e3) / 1e9
    line = f"{xla:.0f}"
    if torch is not None:
      ta, tb = torch.ones(m, kk), torch.ones(kk, n)
      line += f" (torch {flop / (ms(lambda: np.asarray(ta @ tb)) / 1e3) / 1e9:.0f})"
    rows.append((f"matmul {m}x{kk}x{n} GFLOP/s, XLA (torch 2 threads)", line))

  width = max(len(k) for k, _ in rows)
  table = "\n".join([f"| {'what':<{width}} | ms (or GFLOP/s) |", f"|{'-' * (width + 2)}|--:|"] +
                    [f"| {k:<{width}} | {v if isinstance(v, str) else f'{v:.1f}'} |"
                     for k, v in rows])
  print(table)
  if not args.no_append:
    append_result("cpu_profile", f"{machine()}; medians of {args.repeats} runs", table)


if __name__ == "__main__":
  main()
