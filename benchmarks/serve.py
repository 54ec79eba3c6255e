"""Serving: the engine (llm.serve) on a fixed synthetic trace, against transformers'
continuous batching and our static Decoder on the same weights, in one run.

  python benchmarks/serve.py [--config configs/llama_125m.py --concurrent 16 --new_tokens 64
                              --requests 48 --rates 2,8 --prefix 1024 --no_hf]

Random params of the config's model shape (fp32). Parts, each printed and appended with
the command to BENCHMARKS.md:
  1. warm-up: compile seconds per token bucket;
  2. throughput at `--concurrent` requests submitted together (prompts 32-256 tokens,
     exactly `--new_tokens` each, greedy; each system's best of `--repeats`): ours, transformers' `generate_batch` (its
     continuous batching, paged cache, CPU) and our static `Decoder` (one padded batch);
     on a GPU with vLLM installed, vLLM on the same weights too (benchmarks/vllm_peer.py,
     its own process: start this one with XLA_PYTHON_CLIENT_MEM_FRACTION=0.4);
  3. a replayed trace per Poisson rate: long-tailed prompt and output lengths, a third of
     the requests opening with one shared system prompt; output tokens/s, requests/s,
     time to first token and inter-token latency (p50, p99), peak pages, prefix hit rate;
  4. a `--prefix`-token prompt cold, then again with another ending: TTFT ratio.
With `--http`, instead: our server against `transformers serve --continuous-batching` on
one client trace (benchmarks/serve_http.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine, random_params  # noqa: E402
from benchmarks.decode import hf_peer  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.inference import Decoder, SamplingParams  # noqa: E402
from llm.serve.engine import Engine  # noqa: E402
from llm.serve.request import SamplingOptions  # noqa: E402


def _pct(xs, q):
  return float(np.percentile(xs, q)) if xs else float("nan")


def run_together(engine: Engine, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
  """Seconds to finish all `prompts` submitted at once (greedy, exactly new_tokens)."""
  t0 = time.perf_counter()
  rids = [engine.add_request(p, SamplingOptions(max_tokens=new_tokens, temperature=0.0,
                                                ignore_eos=True)) for p in prompts]
  out = {r: [] for r in rids}
  while engine.has_unfinished():
    for o in engine.step():
      out[o.request_id] += o.outputs[0].token_ids
  return time.perf_counter() - t0, [out[r] for r in rids]


def replay(engine: Engine, trace) -> dict:
  """Replays (arrival seconds, prompt, max_tokens) in real time; latency statistics."""
  engine.latencies = dict(ttft=[], itl=[])
  peak = 0
  hits0, queried0 = engine.pool.hit_tokens, engine.pool.queried_tokens
  t0 = time.perf_counter()
  pending, n_out = list(trace), 0
  while pending or engine.has_unfinished():
    now = time.perf_counter() - t0
    while pending and pending[0][0] <= now:
      _, prompt, max_tokens = pending.pop(0)
      engine.add_request(prompt, SamplingOptions(max_tokens=max_tokens, temperature=0.0,
                                                 ignore_eos=True))
    if not engine.has_unfinished():
      time.sleep(min(pending[0][0] - now, 0.05))
      continue
    for o in engine.step():
      n_out += len(o.outputs[0].token_ids)
    peak = max(peak, engine.pool.used)
  secs = time.perf_counter() - t0
  lat = engine.latencies
  queried = engine.pool.queried_tokens - queried0
  return dict(seconds=secs, tokens_per_s=n_out / secs, requests_per_s=len(trace) / secs,
              ttft_p50=_pct(lat["ttft"], 50), ttft_p99=_pct(lat["ttft"], 99),
              itl_p50=_pct(lat["itl"], 50), itl_p99=_pct(lat["itl"], 99), peak_pages=peak,
              hit_rate=(engine.pool.hit_tokens - hits0) / queried if queried else 0.0)


def http_main(args):
  """--http: the servers on one trace (benchmarks/serve_http.py)."""
  import tempfile

  from benchmarks import serve_http
  cfg = load_config(args.config, check=False)
  params = random_params(cfg.model)
  rng = np.random.default_rng(0)
  trace = serve_http.make_trace(rng, args.requests, args.http_rate, args.new_tokens)
  warm = serve_http.make_trace(rng, 4, 100.0, 4)
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = Path(tmp) / "model"
    serve_http.write_hf_dir(hf_dir, hf_peer(cfg, jax.device_get(params), 1024),
                            cfg.model.vocab_size)
    results = serve_http.run_servers(hf_dir, trace, warm, args.http_max_num_seqs,
                                     args.max_num_batched_tokens)
  lines = [f"machine: {machine()}, {os.cpu_count()} cores; model {args.config} (fp32, "
           "random), one byte-level BPE tokenizer; each server warmed with 4 requests first; "
           f"ours with --max_num_seqs={args.http_max_num_seqs} "
           f"--max_num_batched_tokens={args.max_num_batched_tokens}", ""]
  lines += serve_http.report(results, args.http_rate, args.requests, args.new_tokens)
  text = "\n".join(lines)
  print(text)
  if not args.no_append:
    append_result("Serving over HTTP", "Our OpenAI-compatible server against `transformers "
                  "serve --continuous-batching` on one streamed client trace, same weights "
                  "and tokenizer, one run.", text)


def vllm_peer(cfg, params, max_len: int, prompts, new_tokens: int):
  """(seconds, tokens) of vLLM on the same weights, saved as an HF directory, in its own
  process (benchmarks/vllm_peer.py)."""
  import json
  import subprocess
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    hf_peer(cfg, jax.device_get(params), max_len).save_pretrained(tmp)
    Path(tmp, "prompts.json").write_text(json.dumps(prompts))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_peer.py"), tmp,
                          str(Path(tmp, "prompts.json")), str(new_tokens)],
                         capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return result["seconds"], result["tokens"]


def make_trace(rng, n: int, rate: float, vocab: int, system: list[int]):
  arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
  prompt_lens = np.clip(rng.lognormal(4.0, 0.8, n), 8, 384).astype(int)
  out_lens = np.clip(rng.lognormal(3.2, 0.7, n), 4, 128).astype(int)
  trace = []
  for i in range(n):
    body = rng.integers(3, vocab, prompt_lens[i]).tolist()
    trace.append((float(arrivals[i]), (system + body) if i % 3 == 0 else body, int(out_lens[i])))
  return trace


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/llama_125m.py")
  p.add_argument("--concurrent", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--requests", type=int, default=48)
  p.add_argument("--rates", default="2,8", help="Poisson arrival rates, requests/s")
  p.add_argument("--prefix", type=int, default=1024)
  p.add_argument("--page_size", type=int, default=16)
  p.add_argument("--max_num_batched_tokens", type=int, default=512)
  p.add_argument("--repeats", type=int, default=2, help="runs per system; the best counts")
  p.add_argument("--no_hf", action="store_true")
  p.add_argument("--no_vllm", action="store_true", help="on a GPU, skip vLLM (run when installed)")
  p.add_argument("--no_append", action="store_true")
  p.add_argument("--http", action="store_true", help="the HTTP servers instead: ours against "
                 "transformers serve on one client trace (benchmarks/serve_http.py)")
  p.add_argument("--http_rate", type=float, default=4.0, help="--http: arrivals per second")
  p.add_argument("--http_max_num_seqs", type=int, default=64,
                 help="--http: our server's --max_num_seqs (transformers' batch is unbounded)")
  args = p.parse_args()
  if args.http:
    return http_main(args)
  cfg = load_config(args.config, check=False)
  params = random_params(cfg.model)
  vocab = cfg.model.vocab_size
  max_len = args.prefix + 2 * 256
  rng = np.random.default_rng(0)
  lines = [f"machine: {machine()}, {os.cpu_count()} cores; model {args.config} (fp32, random)"]

  t0 = time.perf_counter()
  engine = Engine(cfg.model, params, page_size=args.page_size, kv_cache_gib=2.0,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  max_num_seqs=args.concurrent, max_model_len=max_len)
  warm = time.perf_counter() - t0
  lines += ["", "| token bucket | compile s |", "|--:|--:|"]
  lines += [f"| {b} | {s:.1f} |" for b, s in engine.runner.compile_seconds.items()]
  lines.append(f"\nwarm-up (engine built, every bucket compiled): {warm:.1f} s")

  prompts = [rng.integers(3, vocab, int(n)).tolist()
             for n in rng.integers(32, 257, args.concurrent)]
  # each system's best of --repeats runs: a 2-core machine's timings wander by 10-25%
  runs = []
  for _ in range(args.repeats):
    engine.reset_prefix_cache()  # every run prefills its prompts
    runs.append(run_together(engine, prompts, args.new_tokens))
  ours_s, ours_tokens = min(runs)
  total = args.concurrent * args.new_tokens
  rows = [("ours (llm.serve)", ours_s)]
  decoder = Decoder(cfg.model, params)
  decoder.generate(prompts, args.new_tokens, SamplingParams(temperature=0.0))  # compiles
  seconds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    static = decoder.generate(prompts, args.new_tokens, SamplingParams(temperature=0.0))
    seconds.append(time.perf_counter() - t0)
  rows.append(("static Decoder (one padded batch)", min(seconds)))
  same_static = static == ours_tokens
  same_hf = None
  if not args.no_hf:
    import torch
    import transformers
    hf = hf_peer(cfg, jax.device_get(params), max_len)
    gen = transformers.GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    hf.generate_batch(prompts[:2], generation_config=gen, progress_bar=False)  # warm
    seconds = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      with torch.no_grad():
        res = hf.generate_batch(prompts, generation_config=gen, progress_bar=False)
      seconds.append(time.perf_counter() - t0)
    rows.append(("transformers generate_batch (continuous batching)", min(seconds)))
    hf_tokens = [list(r.generated_tokens) for r in sorted(res.values(),
                                                            key=lambda r: int(r.request_id.split("_")[-1]))]
    same_hf = hf_tokens == ours_tokens
  same_vllm = None
  if jax.default_backend() == "gpu" and importlib.util.find_spec("vllm") and not args.no_vllm:
    seconds, vllm_tokens = vllm_peer(cfg, params, max_len, prompts, args.new_tokens)
    rows.append(("vLLM (same HF weights, fp32)", seconds))
    same_vllm = vllm_tokens == ours_tokens
  lines += ["", f"{args.concurrent} requests together, prompts 32-256 tokens, {args.new_tokens} "
                "new tokens each (greedy):", "",
            "| system | seconds | output tokens/s | its time / ours (>1: ours faster) |", "|---|--:|--:|--:|"]
  lines += [f"| {name} | {s:.2f} | {total / s:,.1f} | {s / ours_s:.2f}x |" for name, s in rows]
  lines.append(f"\ngreedy tokens equal: static Decoder {same_static}"
               + ("" if same_hf is None else f", transformers {same_hf}")
               + ("" if same_vllm is None else f", vLLM {same_vllm}"))

  system = rng.integers(3, vocab, 256).tolist()
  lines += ["", f"replayed trace: {args.requests} requests, a third opening with one 256-token "
                "system prompt; prompts lognormal 8-384 tokens, outputs 4-128:", "",
            "| rate req/s | out tok/s | req/s | TTFT p50 / p99 s | ITL p50 / p99 s | "
            "peak pages | prefix hit rate |", "|--:|--:|--:|--:|--:|--:|--:|"]
  for rate in [float(r) for r in args.rates.split(",")]:
    r = replay(engine, make_trace(rng, args.requests, rate, vocab, system))
    lines.append(f"| {rate:g} | {r['tokens_per_s']:,.1f} | {r['requests_per_s']:.2f} | "
                 f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['itl_p50']:.3f} / "
                 f"{r['itl_p99']:.3f} | {r['peak_pages']} | {r['hit_rate']:.2f} |")

  long = rng.integers(3, vocab, args.prefix).tolist()
  ttfts = []
  for ending in (rng.integers(3, vocab, 8).tolist(), rng.integers(3, vocab, 8).tolist()):
    engine.latencies = dict(ttft=[], itl=[])
    run_together(engine, [long + ending], 1)
    ttfts.append(engine.latencies["ttft"][0])
  lines.append(f"\n{args.prefix}-token prefix: time to first token cold {ttfts[0]:.3f} s, "
               f"repeated (cached) {ttfts[1]:.3f} s: {ttfts[1] / ttfts[0]:.2f}x")
  text = "\n".join(lines)
  print(text)
  if not args.no_append:
    append_result("Serving engine", "Continuous batching over paged KV against transformers' "
                  "continuous batching and the static decoder, same weights, same run.", text)


if __name__ == "__main__":
  main()
