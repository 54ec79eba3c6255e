"""Weight-only quantized inference (`python -m llm.quantize`, model.weight_quant): held-out
perplexity against the float model, and batch-1 decode tokens/s of the static Decoder
and the serving engine for fp32, bf16, int8 and int4 weights, with llama.cpp's f32 and
q8_0 (llama-cpp-python, when installed) as the peer's ratio, in one run.

- quality: --workdir quantized with llm.quantize, then llm.evaluate's perplexity over
  its validation split;
- speed: --workdir, and the llama_125m recipe's shape (random weights: speed only),
  quantized in memory the same way; bf16 = params and compute in bfloat16.

    python benchmarks/quantized.py --workdir=runs/tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_result, machine, random_params  # noqa: E402

KINDS = ("fp32", "bf16", "int8", "int4", "fp32, int8 KV")


def _variant(model_cfg, params, kind: str):
  """(model config, params) of `kind`, from float32 ones."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from llm.model import quant
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if kind == "bf16":
    cfg.update(dtype="bfloat16", param_dtype="bfloat16")
    return cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  if kind == "fp32, int8 KV":
    cfg.kv_quant = "int8"
    return cfg, params
  if kind in ("int8", "int4"):
    cfg.weight_quant = kind
    return cfg, jax.jit(quant.quantize_base, static_argnums=1)(params, kind)
  return cfg, params


def _decode_tok_s(model_cfg, params, prompt, new: int, seq_len: int) -> tuple[float, float]:
  """(Decoder tok/s, engine tok/s) for one greedy batch-1 request, after a compiling run."""
  from llm.inference.decoder import Decoder
  from llm.inference.sampling import SamplingParams
  from llm.serve.engine import Engine
  from llm.serve.request import SamplingOptions
  decoder = Decoder(model_cfg, params)
  greedy = SamplingParams(temperature=0.0)
  decoder.generate([prompt], new, greedy)
  t0 = time.perf_counter()
  decoder.generate([prompt], new, greedy)
  dec = new / (time.perf_counter() - t0)
  engine = Engine(model_cfg, params, None, page_size=16, num_pages=2 * (seq_len // 16) + 2,
                  max_num_batched_tokens=64, max_num_seqs=1, max_model_len=seq_len)
  options = SamplingOptions(max_tokens=new, temperature=0.0, ignore_eos=True)
  engine.generate([prompt], [options])
  engine.reset_prefix_cache()
  t0 = time.perf_counter()
  engine.generate([prompt], [options])
  return dec, new / (time.perf_counter() - t0)


def _random_workdir(path: Path, config, model_cfg, params, tokenizer: Path) -> str:
  """A workdir holding `params` of `model_cfg` (random weights), for the GGUF export."""
  from llm.workdir import Workdir, save_params
  wd = Workdir(path)
  cfg = config.copy_and_resolve_references()
  cfg.model = model_cfg
  cfg.data.tokenizer_path = str(tokenizer.absolute())
  save_params(wd.params, params)
  wd.write_config(cfg)
  return str(path)


def _llama_cpp_tok_s(workdir: str, prompt, new: int, seq_len: int) -> dict:
  try:
    import llama_cpp
  except ImportError:
    return {}
  from llm.convert.gguf_export import llm_to_gguf
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in ("f32", "q8_0"):
      path = f"{tmp}/{kind}.gguf"
      llm_to_gguf(workdir, path, kind)
      kv = dict(type_k=0, type_v=0) if kind == "f32" else {}
      llm = llama_cpp.Llama(model_path=path, n_ctx=seq_len, n_threads=2, verbose=False, **kv)
      for timed in (False, True):
        t0 = time.perf_counter()
        n = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
          n += 1
          if n == new:
            break
        if timed:
          out[kind] = new / (time.perf_counter() - t0)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/tiny")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--no_append", action="store_true")
  args = ap.parse_args()
  import jax

  from llm import objectives
  from llm.inference import load
  from llm.quantize import quantize_workdir
  from tests.helpers import load_recipe

  config, params, tok = load(args.workdir)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  quality = {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in ("fp32", "int8", "int4"):
      wd = args.workdir
      if kind != "fp32":
        wd = str(quantize_workdir(args.workdir, f"{tmp}/{kind}", kind))
      c, p, t = load(wd)
      quality[kind] = objectives.heldout(c, p, t, wd)["perplexity"]
      print(kind, "perplexity", quality[kind], flush=True)

  prompt = tok.bos_prefix() + list(tok.encode("ROMEO: What light through yonder window"))
  seq_len = config.data.seq_len
  new = min(args.new_tokens, seq_len - len(prompt))
  big = load_recipe("llama_125m").model
  big.update(vocab_size=config.model.vocab_size)
  big_params = random_params(big)
  big_n = sum(x.size for x in jax.tree.leaves(big_params))
  speed = {}
  for name, (cfg, prm, length) in {args.workdir: (config.model, params, seq_len),
                                   "llama_125m shape": (big, big_params, 256)}.items():
    for kind in KINDS:
      speed[name, kind] = _decode_tok_s(*_variant(cfg, prm, kind), prompt, new, length)
      print(name, kind, speed[name, kind], flush=True)
  peer = {args.workdir: _llama_cpp_tok_s(args.workdir, prompt, new, seq_len)}
  if peer[args.workdir]:
    from llm.workdir import Workdir
    with tempfile.TemporaryDirectory() as tmp:
      wd = _random_workdir(Path(tmp) / "125m", config, big, big_params,
                           Workdir(args.workdir).tokenizer(config))
      peer["llama_125m shape"] = _llama_cpp_tok_s(wd, prompt, new, 256)

  lines = ["| weights | held-out perplexity | vs fp32 |", "|---|--:|--:|"]
  for kind, ppl in quality.items():
    lines.append(f"| {kind} | {ppl:.4f} | {100 * (ppl / quality['fp32'] - 1):+.2f}% |")
  lines += ["", "| model | weights | Decoder tok/s | vs fp32 | engine tok/s | vs fp32 |",
            "|---|---|--:|--:|--:|--:|"]
  for (name, kind), (dec, eng) in speed.items():
    d0, e0 = speed[name, "fp32"]
    lines.append(f"| {name} | {kind} | {dec:.0f} | {dec / d0:.2f}x | {eng:.0f} | "
                 f"{eng / e0:.2f}x |")
  for name, p in peer.items():
    if p:
      lines += ["", f"Peer, llama.cpp (llama-cpp-python 0.3.36, 2 threads) on {name}, same "
                f"prompt and {new} tokens: f32 {p['f32']:.0f} tok/s, q8_0 {p['q8_0']:.0f} tok/s "
                f"({p['q8_0'] / p['f32']:.2f}x)."]
  body = "\n".join(lines)
  desc = (f"{machine()}, 2 CPU cores. Quality on {args.workdir} ({n_params / 1e6:.2f}M "
          f"parameters), quantized with `python -m llm.quantize`, perplexity as "
          f"`python -m llm.evaluate` reports it. Speed: one greedy batch-1 request, prompt "
          f"{len(prompt)} tokens, {new} new tokens, after a compiling run; the llama_125m "
          f"shape has {big_n / 1e6:.1f}M parameters (vocab {big.vocab_size}), random "
          "weights. Projection kernels are quantized; embeddings, norms and the "
          "unembedding stay fp32. 'int8 KV': fp32 weights, keys and values cached int8 "
          "(the engine's kv_cache_dtype=int8, the Decoder's model.kv_quant=int8).")
  print(body)
  if not args.no_append:
    append_result("Weight-only quantized inference (CPU)", desc, body)


if __name__ == "__main__":
  main()
