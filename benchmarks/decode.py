"""Decoding throughput: prefill tokens/s and decode tokens/s against batch size.

  python benchmarks/decode.py [--config configs/llama_125m.py --batches 1,4,16 --prompt_len 128
                               --new_tokens 128 --no_hf]

Random params of the config's model shape; timings exclude compilation (each
shape is run once first). The peer, in the same run: transformers' generate with the
same weights, eager (DynamicCache) and with a static cache, and whether its greedy
tokens equal ours. Also the batch-1 memory-bandwidth bound (weights read once per
token at the measured copy bandwidth). Prints a table and appends it, with the command,
to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine, random_params  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.inference import Decoder, SamplingParams  # noqa: E402
from llm.inference.decoder import round_up  # noqa: E402


def hf_peer(cfg, params, max_position: int):
  """transformers' model with the same weights (LlamaForCausalLM, fp32), 2 torch threads."""
  import torch
  import transformers

  from llm.convert.hf import hf_config_from_model, params_to_hf
  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = hf_config_from_model(cfg.model, max_position)
  config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  state = {name: torch.from_numpy(np.array(t)) for name, t in params_to_hf(params, cfg.model)}
  missing, unexpected = model.load_state_dict(state, strict=False)
  tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
  if tied:
    model.tie_weights()
  if unexpected or [m for m in missing if "rotary" not in m and m not in tied]:
    raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
  return model


def hf_generate(model, prompts, new_tokens: int, static: bool):
  """(tokens [B, new_tokens], seconds) of greedy generation of exactly new_tokens."""
  import torch
  ids = torch.tensor(prompts)
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, attention_mask=torch.ones_like(ids))
  if static:
    kw["cache_implementation"] = "static"
  with torch.inference_mode():
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    return out[:, ids.shape[1]:].numpy(), time.perf_counter() - t0


def bandwidth_gbs() -> float:
  """Memory traffic of copying a 256 MB array (GB/s, bytes read + written per second)."""
  a = np.ones(32 << 20)
  b = np.zeros_like(a)  # touched: no page faults in the timed copies
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - t0)
  return 2 * a.nbytes / best / 1e9


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "llama_125m.py"))
  p.add_argument("--batches", default="1,4,16")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=2, help="timed runs per system (best kept)")
  p.add_argument("--no_hf", action="store_true", help="skip the transformers peer")
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  cfg = load_config(args.config, check=False)
  params = random_params(cfg.model)
  decoder = Decoder(cfg.model, params)
  greedy = SamplingParams(temperature=0.0)
  hf = None if args.no_hf else hf_peer(cfg, params, args.prompt_len + args.new_tokens + 64)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  gbs = bandwidth_gbs()
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = [list(np.random.default_rng(i).integers(3, cfg.model.vocab_size, args.prompt_len))
               for i in range(b)]
    decoder.generate(prompts, args.new_tokens, greedy)  # compile prefill and steps (this shape)
    _, s = decoder.shapes(args.prompt_len, round_up(args.new_tokens, decoder.chunk))
    tokens = jnp.asarray(np.array(prompts, np.int32))
    valid = jnp.ones(tokens.shape, bool)
    jax.block_until_ready(decoder._prefill(decoder.params, tokens, valid, decoder.init_cache(b, s)))
    cache = decoder.init_cache(b, s)
    t0 = time.perf_counter()
    jax.block_until_ready(decoder._prefill(decoder.params, tokens, valid, cache))
    prefill_s = time.perf_counter() - t0
    total_s = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      ours = decoder.generate(prompts, args.new_tokens, greedy)
      total_s = min(total_s, time.perf_counter() - t0)
    decode_s = max(total_s - prefill_s, 1e-9)
    row = {"batch": b, "prefill": b * args.prompt_len / prefill_s,
           "decode": b * args.new_tokens / decode_s, "ms": 1e3 * decode_s / args.new_tokens,
           "total": b * args.new_tokens / total_s}
    if hf is not None:
      for static in (False, True):
        hf_generate(hf, prompts, 2, static)  # warm up
        hf_s = float("inf")
        for _ in range(args.repeats):
          hf_tokens, seconds = hf_generate(hf, prompts, args.new_tokens, static)
          hf_s = min(hf_s, seconds)
        row["hf_static" if static else "hf"] = b * args.new_tokens / hf_s
        if not static:
          row["same"] = all(list(o) == list(h[:len(o)]) for o, h in zip(ours, hf_tokens))
    rows.append(row)
    print(row, flush=True)
  header = "| batch | prefill tokens/s | decode tokens/s | ms per decode step | end to end tokens/s |"
  sep = "|---:|---:|---:|---:|---:|"
  if hf is not None:
    header += " transformers eager | transformers static cache | ours / eager | greedy tokens equal |"
    sep += "---:|---:|---:|:---:|"
  table = [header, sep]
  for r in rows:
    line = (f"| {r['batch']} | {r['prefill']:,.0f} | {r['decode']:,.1f} | {r['ms']:.1f} | "
            f"{r['total']:,.1f} |")
    if hf is not None:
      line += (f" {r['hf']:,.1f} | {r['hf_static']:,.1f} | {r['total'] / r['hf']:.2f}x | "
               f"{'yes' if r['same'] else 'NO'} |")
    table.append(line)
  bound = gbs * 1e9 / weight_bytes  # each decode step reads every weight once
  b1 = next((r for r in rows if r["batch"] == 1), None)
  notes = (f"Memory-bandwidth bound at batch 1: {weight_bytes / 1e6:,.0f} MB of weights per step "
           f"at {gbs:,.1f} GB/s (measured copy traffic, bytes read + written per second) = "
           f"{bound:,.1f} "
           "tokens/s" + (f"; ours reaches {b1['decode'] / bound:.0%} of it." if b1 else "."))
  print("\n".join(table) + "\n\n" + notes)
  if not args.no_append:
    n_params = sum(x.size for x in jax.tree.leaves(params))
    append_result("decode", f"{machine()}; {Path(args.config).name} ({n_params:,} params, "
                  f"{cfg.model.dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
                  f"greedy, KV cache ({'unrolled, a cache buffer per layer' if decoder.unrolled else 'scanned'}); "
                  "transformers 'generate' with the same weights in the same run (eager = "
                  "DynamicCache; static = cache_implementation='static'), end-to-end tokens/s "
                  "including prefill, torch threads = CPU cores", "\n".join(table) + "\n\n" + notes)


if __name__ == "__main__":
  main()
