"""KV-cache bytes per token: multi-head latent attention (MLA) against grouped-query (GQA)
and multi-head (MHA) attention at about equal model size, measured on the caches the
static Decoder and the serving engine allocate (their arrays' bytes / token slots), plus
decode tokens/s at batch 1 over a long prompt; then the same arithmetic at DeepSeek-V3's
shape (61 layers, bf16), where only the recipe's MLA is real and the GQA / MHA rows are
what its 128 heads would cache instead.

    python benchmarks/kv_cache.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_result, machine, random_params  # noqa: E402


def _configs(d_model: int, n_layers: int, n_heads: int):
  from llm.config import base_config
  e = d_model // n_heads
  out = {}
  for name in ("MHA", "GQA (K = H/4)", "MLA"):
    c = base_config().model
    c.update(vocab_size=2048, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
             n_kv_heads=n_heads, d_ff=4 * d_model, remat="none")
    if name.startswith("GQA"):
      c.n_kv_heads = n_heads // 4
    if name == "MLA":  # DeepSeek-V3's proportions: latent 4 x head dim, RoPE key head dim / 2
      c.head_dim = e + e // 2
      c.mla.update(kv_lora_rank=4 * e, q_lora_rank=0, qk_nope_head_dim=e,
                   qk_rope_head_dim=e // 2, v_head_dim=e)
    out[name] = c
  return out


def _decoder_cache_bytes(cfg, params, slots: int) -> float:
  import jax

  from llm.inference.decoder import Decoder
  cache = Decoder(cfg, params).init_cache(1, slots)
  return sum(x.nbytes for x in jax.tree.leaves(cache)) / slots


def _engine(cfg, params, max_len: int):
  from llm.serve.engine import Engine
  return Engine(cfg, params, page_size=16, num_pages=max_len // 16 + 4, max_num_seqs=1,
                max_num_batched_tokens=256, max_model_len=max_len, buckets=(16, 256),
                warm_up=False)


def _engine_page_bytes(engine) -> float:
  import jax
  pages = engine.runner.pages
  tokens = engine.runner.num_pages * engine.runner.page_size
  return sum(x.nbytes for x in jax.tree.leaves(pages)) / tokens


def _decode_tok_s(cfg, params, engine, prompt, new: int) -> tuple[float, float]:
  from llm.inference.decoder import Decoder
  from llm.inference.sampling import SamplingParams
  from llm.serve.request import SamplingOptions
  decoder = Decoder(cfg, params)
  rates = []
  for run in (lambda: decoder.generate([prompt], new, SamplingParams(temperature=0)),
              lambda: engine.generate([prompt], [SamplingOptions(max_tokens=new,
                                                                 temperature=0.0)])):
    run()  # compiles
    t0 = time.perf_counter()
    run()
    rates.append(new / (time.perf_counter() - t0))
  return rates[0], rates[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--n_layers", type=int, default=8)
  parser.add_argument("--n_heads", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens for the speed run")
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args()
  import jax.numpy as jnp
  import numpy as np

  from llm.config import kv_cache_vectors
  from llm.params import count_params
  from tests.helpers import load_recipe

  max_len = args.prompt + args.new + 64
  prompt = np.random.default_rng(0).integers(3, 2048, args.prompt).tolist()
  rows = []
  for name, cfg in _configs(args.d_model, args.n_layers, args.n_heads).items():
    params = random_params(cfg)
    engine = _engine(cfg, params, max_len)
    dec_bytes = _decoder_cache_bytes(cfg, params, max_len)
    eng_bytes = _engine_page_bytes(engine)
    dec_rate, eng_rate = _decode_tok_s(cfg, params, engine, prompt, args.new)
    rows.append((name, count_params(cfg), dec_bytes, eng_bytes, dec_rate, eng_rate))
  mha = rows[0][2]
  table = ["| attention | params | Decoder cache B/token | engine pages B/token | vs MHA | "
           "Decoder tok/s | engine tok/s |", "|---|--:|--:|--:|--:|--:|--:|"]
  for name, n, dec, eng, dr, er in rows:
    table.append(f"| {name} | {n / 1e6:.2f}M | {dec:,.0f} | {eng:,.0f} | {dec / mha:.3f} | "
                 f"{dr:.1f} | {er:.1f} |")

  v3 = load_recipe("deepseek_v3").model
  bf16 = jnp.dtype(jnp.bfloat16).itemsize
  e = v3.mla.qk_nope_head_dim + v3.mla.qk_rope_head_dim
  shape = [("MLA (the recipe: latent 512 + RoPE key 64)", kv_cache_vectors(v3)[0] *
            kv_cache_vectors(v3)[1]),
           ("GQA, 8 KV heads of 192 / 128 (k / v)", 8 * (e + v3.mla.v_head_dim)),
           ("MHA, 128 heads of 192 / 128 (k / v)", v3.n_heads * (e + v3.mla.v_head_dim))]
  mha_v3 = shape[-1][1]
  table += ["", "| DeepSeek-V3 shape (61 layers, bf16) | values / token / layer | KiB / token | "
            "vs MHA |", "|---|--:|--:|--:|"]
  for name, values in shape:
    table.append(f"| {name} | {values:,} | {values * v3.n_layers * bf16 / 1024:,.1f} | "
                 f"{values / mha_v3:.4f} |")
  body = "\n".join(table)
  print(body)
  if not args.no_append:
    append_result(
        "kv_cache: MLA vs GQA vs MHA bytes per token",
        f"{machine()}; d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads "
        f"(head dim {args.d_model // args.n_heads}), fp32, random weights; MLA with "
        "DeepSeek-V3's proportions (latent 4 x head dim, RoPE key head dim / 2, no q "
        "bottleneck). Bytes are the allocated caches' over their token slots; tok/s is one "
        f"greedy request of {args.new} tokens after a {args.prompt}-token prompt (MLA decodes "
        "from the latent, projections absorbed).", body)


if __name__ == "__main__":
  main()
