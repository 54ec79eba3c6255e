"""Decoding throughput: prefill tokens/s and decode tokens/s against batch size.

  python benchmarks/decode.py [--config configs/llama_125m.py --batches 1,4,16 --prompt_len 128
                               --new_tokens 64]

Random params of the config's model shape; timings exclude compilation (each
shape is run once first). Prints a table and appends it, with the command, to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.inference import Decoder, SamplingParams  # noqa: E402
from llm.model import make_model  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "llama_125m.py"))
  p.add_argument("--batches", default="1,4,16")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  cfg = load_config(args.config, check=False)
  model = make_model(cfg.model)
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))()
  decoder = Decoder(cfg.model, params)
  greedy = SamplingParams(temperature=0.0)
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = [list(np.random.default_rng(i).integers(3, cfg.model.vocab_size, args.prompt_len))
               for i in range(b)]
    decoder.generate(prompts, 2, greedy)  # compile prefill and step for this shape
    _, s = decoder.shapes(args.prompt_len, args.new_tokens)
    tokens = jnp.asarray(np.array(prompts, np.int32))
    valid = jnp.ones(tokens.shape, bool)
    cache = decoder.init_cache(b, s)
    jax.block_until_ready(decoder._prefill(params, tokens, valid, cache))
    t0 = time.perf_counter()
    jax.block_until_ready(decoder._prefill(params, tokens, valid, decoder.init_cache(b, s)))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoder.generate(prompts, args.new_tokens, greedy)
    total_s = time.perf_counter() - t0
    decode_s = max(total_s - prefill_s, 1e-9)
    rows.append((b, b * args.prompt_len / prefill_s, b * args.new_tokens / decode_s,
                 1e3 * decode_s / args.new_tokens))
  table = ["| batch | prefill tokens/s | decode tokens/s | ms per decode step |",
           "|------:|-----------------:|----------------:|-------------------:|"]
  table += [f"| {b} | {pf:,.0f} | {dc:,.0f} | {ms:.1f} |" for b, pf, dc, ms in rows]
  print("\n".join(table))
  if not args.no_append:
    n_params = sum(x.size for x in jax.tree.leaves(params))
    append_result("decode", f"{machine()}; {Path(args.config).name} ({n_params:,} params, "
                  f"{cfg.model.dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
                  "greedy, KV cache", "\n".join(table))


if __name__ == "__main__":
  main()
