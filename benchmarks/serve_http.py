"""The HTTP servers on one client trace: ours (`python -m llm.serve`) against
`transformers serve --continuous-batching` (its OpenAI server), on the same weights and
tokenizer (an HF directory written here), one after the other, in one run. Called by
`python benchmarks/serve.py --http`.

On a GPU with vLLM installed, vLLM's OpenAI server runs the same trace too (each server
in its own process, one after the other).

The trace: Poisson arrivals, prompts of lognormal length (text), a fixed number of new
tokens each (temperature 0); every request streams. Per server: output tokens/s,
requests/s, time to first token and inter-token latency p50 / p99 as the client sees them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_hf_dir(out: Path, hf_model, vocab_size: int) -> None:
  """The model and a byte-level BPE tokenizer (trained on the standard library's source,
  at most `vocab_size` tokens) as a Hugging Face directory both servers load."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  hf_model.save_pretrained(out)
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_trace(rng, n: int, rate: float, new_tokens: int):
  words = (Path(os.__file__).read_text().split())
  arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
  lengths = np.clip(rng.lognormal(3.8, 0.7, n), 8, 200).astype(int)
  return [(float(a), " ".join(rng.choice(words, int(k))), new_tokens)
          for a, k in zip(arrivals, lengths)]


async def _one(http, model: str, prompt: str, max_tokens: int, started: float, out: dict):
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
          "stream": True, "stream_options": {"include_usage": True}}
  chunk_times, tokens = [], None
  async with http.stream("POST", "/v1/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      data = json.loads(line[6:])
      if data.get("usage"):
        tokens = data["usage"]["completion_tokens"]
      if data.get("choices"):  # a token's chunk (its text may be empty: a partial character)
        chunk_times.append(time.perf_counter())
  if not chunk_times:
    raise RuntimeError("a stream carried no tokens")
  out["ttft"].append(chunk_times[0] - started)
  out["itl"] += list(np.diff(chunk_times))
  out["tokens"] += tokens if tokens is not None else len(chunk_times)


async def replay(url: str, model: str, trace) -> dict:
  import httpx
  out = {"ttft": [], "itl": [], "tokens": 0}
  async with httpx.AsyncClient(base_url=url, timeout=600,
                               limits=httpx.Limits(max_connections=1000)) as http:
    t0 = time.perf_counter()

    async def at(arrival, prompt, max_tokens):
      await asyncio.sleep(max(arrival - (time.perf_counter() - t0), 0))
      await _one(http, model, prompt, max_tokens, time.perf_counter(), out)

    await asyncio.gather(*(at(*r) for r in trace))
    seconds = time.perf_counter() - t0
  pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
  return dict(seconds=seconds, tokens_per_s=out["tokens"] / seconds,
              requests_per_s=len(trace) / seconds, ttft_p50=pct(out["ttft"], 50),
              ttft_p99=pct(out["ttft"], 99), itl_p50=pct(out["itl"], 50),
              itl_p99=pct(out["itl"], 99))


def _wait_healthy(url: str, proc, seconds: float = 900) -> None:
  import httpx
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}")
    try:
      if httpx.get(url + "/health", timeout=5).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  raise RuntimeError("the server did not become healthy")


def _on_gpu() -> bool:
  import jax
  return jax.default_backend() == "gpu"


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_servers(hf_dir: Path, trace, warm_trace, max_num_seqs: int,
                max_num_batched_tokens: int) -> list[tuple[str, dict]]:
  """Each server in turn: started, warmed with `warm_trace`, timed on `trace`, stopped."""
  servers = [
      ("ours (python -m llm.serve)",
       [sys.executable, "-m", "llm.serve", f"--hf_dir={hf_dir}", "--served_model_name=m",
        f"--max_num_seqs={max_num_seqs}", f"--max_num_batched_tokens={max_num_batched_tokens}",
        "--kv_cache_gib=1", "--max_model_len=1024", "--log_level=warning"], "m"),
      ("transformers serve --continuous-batching",
       [str(Path(sys.executable).parent / "transformers"), "serve", str(hf_dir),
        "--continuous-batching", "--device=cpu", "--dtype=float32", "--log-level=warning"],
       str(hf_dir))]
  if _on_gpu() and importlib.util.find_spec("vllm"):  # its OpenAI server, same directory
    servers.append(("vLLM (OpenAI server)",
                    [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                     f"--model={hf_dir}", "--served-model-name=m", "--dtype=float32",
                     "--gpu-memory-utilization=0.4", "--host=127.0.0.1"], "m"))
  results = []
  for name, cmd, model in servers:
    port = _free_port()
    cmd = cmd + ([f"--port={port}"] if "transformers" not in cmd[0] else
                 ["--host=127.0.0.1", f"--port={port}"])
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      try:
        _wait_healthy(url, proc)
        asyncio.run(replay(url, model, warm_trace))
        results.append((name, asyncio.run(replay(url, model, trace))))
      except Exception:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        raise
      finally:
        proc.terminate()
        try:
          proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
          proc.kill()
  return results


def report(results, rate: float, n: int, new_tokens: int) -> list[str]:
  lines = [f"{n} streamed requests, Poisson arrivals at {rate:g}/s, prompts 8-200 words, "
           f"{new_tokens} new tokens each (temperature 0):", "",
           "| server | out tok/s | req/s | TTFT p50 / p99 s | ITL p50 / p99 s |",
           "|---|--:|--:|--:|--:|"]
  for name, r in results:
    lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                 f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | {r['itl_p50']:.3f} / "
                 f"{r['itl_p99']:.3f} |")
  ours = results[0][1]
  for name, r in results[1:]:
    lines += ["", f"ours against {name} (>1: ours better): throughput "
                  f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x, TTFT p50 "
                  f"{r['ttft_p50'] / ours['ttft_p50']:.2f}x, p99 {r['ttft_p99'] / ours['ttft_p99']:.2f}x, "
                  f"ITL p50 {r['itl_p50'] / ours['itl_p50']:.2f}x, p99 "
                  f"{r['itl_p99'] / ours['itl_p99']:.2f}x"]
  return lines
