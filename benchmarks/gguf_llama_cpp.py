"""GGUF export figures: file size, llama.cpp's logits against ours, and batch-1 decode
speed of llama.cpp (llama-cpp-python, built from pip) against our static decoder, per
--type, on one workdir.

    pip install llama-cpp-python==0.3.36
    python benchmarks/gguf_llama_cpp.py --workdir=runs/tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_result, machine  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/tiny")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--no_append", action="store_true")
  args = ap.parse_args()
  import jax.numpy as jnp
  import llama_cpp
  import numpy as np

  from llm.convert.gguf_export import TYPES, llm_to_gguf
  from llm.inference.decoder import Decoder
  from llm.inference.sampling import SamplingParams
  from llm.model import forward, make_model
  from llm.workdir import load_params, load_tokenizer

  config, params = load_params(args.workdir)
  tok = load_tokenizer(args.workdir, config)
  prompt = tok.bos_prefix() + list(tok.encode("ROMEO: What light through yonder window"))
  n = len(prompt)
  t = jnp.asarray([prompt])
  logits = np.asarray(forward(make_model(config.model), params,
                              {"inputs": t, "targets": t,
                               "segment_ids": jnp.ones((1, n), jnp.int32),
                               "positions": jnp.arange(n)[None]})[0][0], np.float32)
  new = min(args.new_tokens, config.data.seq_len - n)
  decoder = Decoder(config.model, params)
  greedy = SamplingParams(temperature=0.0)
  decoder.generate([prompt], new, greedy)  # compiles
  t0 = time.perf_counter()
  ours = decoder.generate([prompt], new, greedy)[0]
  ours_s = time.perf_counter() - t0
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for kind in TYPES:
      path = Path(tmp) / f"{kind}.gguf"
      llm_to_gguf(args.workdir, str(path), kind)
      kv = dict(type_k=0, type_v=0) if kind == "f32" else {}
      llm = llama_cpp.Llama(model_path=str(path), n_ctx=config.data.seq_len, n_threads=2,
                            logits_all=True, verbose=False, **kv)
      llm.eval(prompt)
      err = np.abs(np.asarray(llm.scores[:n], np.float32) - logits).max() / logits.std()
      llm.reset()
      t0 = time.perf_counter()
      out = []
      for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == new:
          break
      secs = time.perf_counter() - t0
      same = sum(a == b for a, b in zip(out, ours))
      rows.append(f"| {kind} | {path.stat().st_size / 2**20:.2f} | {err:.1e} | "
                  f"{new / secs:.0f} | {same}/{new} |")
      print(rows[-1], flush=True)
  body = "\n".join([
      f"machine: {machine()}, 2 cores; workdir {args.workdir} "
      f"({sum(x.size for x in __import__('jax').tree.leaves(params)):,} parameters); "
      f"prompt {n} tokens, {new} greedy new tokens, batch 1", "",
      "| --type | MiB | max \\|llama.cpp - ours\\| logit / std | llama.cpp decode tok/s | "
      "greedy tokens equal to ours, position by position |", "|---|--:|--:|--:|--:|", *rows, "",
      f"ours (static decoder, fp32, one compiled batch-1 program): {new / ours_s:.0f} tok/s. "
      "f32 rows use an f32 KV cache in llama.cpp; the others its default f16 cache."])
  print(body)
  if not args.no_append:
    append_result("GGUF export: llama.cpp against ours", "Each --type exported with "
                  "`python -m llm.convert llm-to-gguf` and run by llama-cpp-python 0.3.36 "
                  "(llama.cpp built from the pip sdist on this machine).", body)


if __name__ == "__main__":
  main()
