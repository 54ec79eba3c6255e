"""Compile time of the static decoder: the first `generate` (compiling) against the same
call again, on ragged prompts.

  python benchmarks/decode_compile.py [--config configs/llama_125m.py --prompts 16
                                       --min_len 16 --max_len 208 --new_tokens 8]

Random params of the config's model shape. Prints a table and appends it, with the
command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine, random_params, random_prompts  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.inference import Decoder, SamplingParams  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/llama_125m.py")
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--min_len", type=int, default=16)
  p.add_argument("--max_len", type=int, default=208)
  p.add_argument("--new_tokens", type=int, default=8)
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  cfg = load_config(args.config, check=False)
  params = random_params(cfg.model)
  prompts = random_prompts(cfg.model.vocab_size, args.prompts, args.min_len, args.max_len)
  decoder = Decoder(cfg.model, params)
  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    decoder.generate(prompts, args.new_tokens, SamplingParams(temperature=0.0))
    times.append(time.perf_counter() - t0)
  text = (f"machine: {machine()}; {args.config}, {args.prompts} prompts of {args.min_len}-"
          f"{args.max_len} tokens, {args.new_tokens} new tokens\n\n"
          "| call | seconds |\n|---|--:|\n"
          f"| first generate (compiles) | {times[0]:.1f} |\n| the same again | {times[1]:.1f} |\n"
          f"\ncompile overhead: {times[0] - times[1]:.1f} s")
  print(text)
  if not args.no_append:
    append_result("Static decoder compile time", "The first generate compiles the prefill "
                  "and the decode loop; the second reuses them.", text)


if __name__ == "__main__":
  main()
