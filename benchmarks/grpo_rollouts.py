"""GRPO rounds sampled by the serving engine against the static decoder (train.sampler),
and the engine's log-probability parity with the trainer, in one run.

Each case trains GRPO for --rounds steps (one round per step, the recipe's
num_iterations=1) in this process through llm.train, once per sampler, and reads:
- sampled tokens/s: completion tokens (their stop tokens included) / seconds inside the
  sampler, rounds after the first (which compiles);
- steps/s: whole steps, sampling, scoring, the trainer's pass and the update included,
  from the third step on;
- parity: max and mean |engine - trainer| log-probability of the sampled tokens over all
  rounds (sampling/sampling_logp_difference/*), fp32, and with model.dtype=bfloat16.

Cases: the grpo_tiny recipe from its SFT start (configs/grpo_tiny.py, --init, the
last_word prompts in --prompts), and the same prompts with the llama_125m recipe's model
(random weights; the vocabulary is the tokenizer's, so the completions decode).

    python benchmarks/grpo_rollouts.py --init=runs/sft_partial \\
        --tokenizer=runs/tiny/tokenizer.model --prompts=data/last_word/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_result, machine  # noqa: E402


def _case(config, sampler: str, old_logps: str, rounds: int, workdir: Path) -> dict:
  """Trains `rounds` steps with `sampler`; the figures described in the module docstring."""
  from llm.train import train
  from llm.training import rollouts, samplers
  config = config.copy_and_resolve_references()
  config.train.update(sampler=sampler, steps=rounds, log_every=1, eval_every=10**6,
                      checkpoint_every=10**6, async_checkpointing=False)
  config.train.grpo.update(old_logps=old_logps, eval_prompts=4)
  config.optim.warmup_steps = 0
  from llm.serve.runner import ModelRunner
  sampled, steps, relayouts = [], [], []
  cls = samplers.SAMPLERS[sampler]
  generate, next_batch, set_params = cls.generate, rollouts.Rollouts.next, ModelRunner.set_params

  def timed_set_params(self, params):
    t0 = time.perf_counter()
    set_params(self, params)
    if params is not None:
      import jax
      jax.block_until_ready(self.params)
      relayouts.append(time.perf_counter() - t0)

  def timed_generate(self, params, prompts, n, *args):
    t0 = time.perf_counter()
    out = generate(self, params, prompts, n, *args)
    if len(prompts) * n == config.train.batch_size:  # a round (not the held-out replies)
      sampled.append((time.perf_counter() - t0, sum(map(len, out.ids))))
    return out

  def timed_next(self, state, step):
    steps.append(time.perf_counter())
    return next_batch(self, state, step)

  cls.generate, rollouts.Rollouts.next = timed_generate, timed_next
  ModelRunner.set_params = timed_set_params
  try:
    train(config, str(workdir))
  finally:
    cls.generate, rollouts.Rollouts.next = generate, next_batch
    ModelRunner.set_params = set_params
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  diff_max = [r["sampling/sampling_logp_difference/max"] for r in records
              if "sampling/sampling_logp_difference/max" in r]
  diff_mean = [r["sampling/sampling_logp_difference/mean"] for r in records
               if "sampling/sampling_logp_difference/mean" in r]
  seconds = sum(s for s, _ in sampled[1:])
  return {"tokens_per_s": sum(n for _, n in sampled[1:]) / seconds,
          "tokens_per_round": sum(n for _, n in sampled[1:]) / max(len(sampled) - 1, 1),
          "sample_s": seconds / max(len(sampled) - 1, 1),
          "steps_per_s": (len(steps) - 2) / (steps[-1] - steps[1]),
          "relayout_s": sorted(relayouts[2:])[len(relayouts[2:]) // 2] if len(relayouts) > 2
          else None,
          "diff_max": max(diff_max) if diff_max else None,
          "diff_mean": sum(diff_mean) / len(diff_mean) if diff_mean else None}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--init", default="runs/sft_partial", help="grpo_tiny's starting workdir")
  ap.add_argument("--tokenizer", default="runs/tiny/tokenizer.model")
  ap.add_argument("--prompts", default="data/last_word/train.jsonl")
  ap.add_argument("--rounds", type=int, default=8, help="rounds (steps) per grpo_tiny run")
  ap.add_argument("--rounds_125m", type=int, default=4)
  ap.add_argument("--no_125m", action="store_true")
  ap.add_argument("--no_append", action="store_true")
  args = ap.parse_args()
  from llm.config import load_config
  from llm.data.tokenizer import open_tokenizer

  root = Path(__file__).resolve().parents[1]
  tiny = load_config(str(root / "configs" / "grpo_tiny.py"), check=False)
  tiny.train.init_params = str(Path(args.init).resolve())
  tiny.data.update(tokenizer_path=str(Path(args.tokenizer).resolve()),
                   paths=str(Path(args.prompts).resolve()))
  cases = [("grpo_tiny", tiny, args.rounds)]
  if not args.no_125m:
    big = tiny.copy_and_resolve_references()
    recipe = load_config(str(root / "configs" / "llama_125m.py"), check=False).model
    big.model.update({k: recipe[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                              "d_ff", "tie_embeddings", "rope_theta")})
    big.model.vocab_size = open_tokenizer(args.tokenizer).vocab_size
    big.train.init_params = ""
    cases.append(("llama_125m", big, args.rounds_125m))

  rows, parity = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name, config, rounds in cases:
      runs = {}
      for label, sampler, old in (("static decoder", "decoder", "trainer"),
                                  ("engine", "engine", "trainer"),
                                  ("engine, old_logps=sampler", "engine", "sampler")):
        runs[label] = _case(config, sampler, old, rounds, Path(tmp) / f"{name}-{label}")
        print(name, label, runs[label], flush=True)
      bf16 = config.copy_and_resolve_references()
      bf16.model.dtype = "bfloat16"
      runs["engine, bf16"] = _case(bf16, "engine", "trainer", min(rounds, 3),
                                   Path(tmp) / f"{name}-bf16")
      print(name, "bf16", runs["engine, bf16"], flush=True)
      base = runs["static decoder"]
      for label, r in runs.items():
        relayout = "" if r["relayout_s"] is None else f"{r['relayout_s']:.3f}"
        rows.append(f"| {name} | {label} | {r['tokens_per_round']:.0f} | {r['sample_s']:.3f} | "
                    f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                    f"{r['steps_per_s']:.3f} | {r['steps_per_s'] / base['steps_per_s']:.2f}x | "
                    f"{relayout} |")
      for label in ("engine", "engine, bf16"):
        r = runs[label]
        parity.append(f"| {name} | {'bf16' if 'bf16' in label else 'fp32'} | "
                      f"{r['diff_max']:.2e} | {r['diff_mean']:.2e} |")
  n_params = {}
  for name, config, _ in cases:
    from llm.params import count_params
    n_params[name] = count_params(config.model)
  body = "\n".join([
      f"machine: {machine()}, 2 cores; " + "; ".join(
          f"{n}: {p / 1e6:.1f}M parameters" for n, p in n_params.items()),
      "", "| recipe | sampler | completion tokens / round | s / round (sampling) | "
      "sampled tok/s | vs decoder | steps/s (all included) | vs decoder | "
      "layers unstacked, s / round |",
      "|---|---|--:|--:|--:|--:|--:|--:|--:|", *rows, "",
      "Parity: |engine - trainer| log-probability of each sampled token (logits / "
      "temperature), over every round's completion tokens:", "",
      "| recipe | dtype | max | mean |", "|---|---|--:|--:|", *parity])
  print(body)
  if not args.no_append:
    append_result("GRPO rollouts: serving engine vs static decoder",
                  "GRPO rounds (4 prompts x 8 completions, grpo_tiny's settings) sampled by "
                  "train.sampler=engine and =decoder in one run; see the script's docstring "
                  "for what each column counts.", body)


if __name__ == "__main__":
  main()
