"""Generating text from a trained (or converted) workdir with a KV cache.

  python -m llm.generate --workdir=DIR --prompt="ROMEO:" [--max_tokens=200 --temperature=0.8
      --top_k=40 --top_p=0.95 --min_p=0.05 --repetition_penalty=1.1 --seed=0]

Loads DIR/config.json, the latest checkpoint's params and DIR's tokenizer, and
streams text to the console. Python: `config, params, tok = load(DIR)`, then
`generate(config, params, tok, "ROMEO:")` or `Decoder(config.model, params)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from llm.checkpoint import load_params
from llm.data.pipeline import load_tokenizer
from llm.model import make_model
from llm.sampling import SamplingParams, sample


def load(workdir: str | Path):
  """(config, params, tokenizer) of the latest checkpoint in `workdir` (see load_params)."""
  config, params = load_params(workdir)
  return config, params, load_tokenizer(config, workdir, train_if_missing=False)


def round_up(n: int, multiple: int) -> int:
  """`n` rounded up to a multiple, so nearby lengths share one compiled shape."""
  return -(-n // multiple) * multiple


class Decoder:
  """Batched KV-cache decoding with static shapes: a jitted prefill, then a jitted step
  per token. Prompts of different lengths are left-padded; pads are never attended to
  and positions start at 0 at each prompt's first real token."""

  def __init__(self, model_cfg, params):
    self.cfg = model_cfg
    self.model = make_model(model_cfg)
    self.params = params
    self._prefill = jax.jit(self._prefill_fn)
    self._step = jax.jit(self._step_fn, static_argnames=("sampling",), donate_argnums=(1,))

  @staticmethod
  def shapes(prompt_len: int, max_tokens: int) -> tuple[int, int]:
    """(padded prompt length, cache length) for a longest prompt and a token budget."""
    p_len = round_up(prompt_len, 16)
    return p_len, round_up(p_len + max_tokens, 64)

  def init_cache(self, batch: int, max_len: int):
    c = self.cfg
    shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim or c.d_model // c.n_heads)
    dtype = jnp.dtype(c.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def _prefill_fn(self, params, tokens_BP, valid_BP, cache):
    positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
    s = cache["k"].shape[2]
    kv_valid_BS = jnp.zeros((tokens_BP.shape[0], s), bool).at[:, :tokens_BP.shape[1]].set(valid_BP)
    decode = {"slot": jnp.int32(0), "kv_valid": kv_valid_BS}
    logits_BPV, cache = self.model.apply({"params": params}, tokens_BP, None, positions_BP,
                                         cache, decode)
    return logits_BPV[:, -1], cache, kv_valid_BS, positions_BP[:, -1] + 1

  def _step_fn(self, params, carry, *, sampling: SamplingParams):
    """Samples a token from the last logits, feeds it, returns (carry, token)."""
    rng, key = jax.random.split(carry["rng"])
    token_B = sample(key, carry["logits"], sampling, carry["seen"])
    slot = carry["slot"]
    kv_valid_BS = jax.lax.dynamic_update_slice(
        carry["kv_valid"], jnp.ones((token_B.shape[0], 1), bool), (0, slot))
    decode = {"slot": slot, "kv_valid": kv_valid_BS}
    logits_B1V, cache = self.model.apply({"params": params}, token_B[:, None], None,
                                         carry["positions"][:, None], carry["cache"], decode)
    seen = carry["seen"]
    if seen is not None:
      seen = seen.at[jnp.arange(token_B.shape[0]), token_B].set(True)
    carry = dict(cache=cache, kv_valid=kv_valid_BS, slot=slot + 1, positions=carry["positions"] + 1,
                 logits=logits_B1V[:, 0], rng=rng, seen=seen)
    return carry, token_B

  def generate(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams,
               seed: int = 0, eos_id: int | None = None, on_token=None) -> list[list[int]]:
    """Continuations (without EOS) of each prompt. `on_token(step, tokens_B, done_B)` is
    called after every step, e.g. to stream text."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if max_tokens < 1:
      raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    b = len(prompts)
    p_len, s = self.shapes(max(len(p) for p in prompts), max_tokens)
    tokens = np.zeros((b, p_len), np.int32)
    valid = np.zeros((b, p_len), bool)
    for i, prompt in enumerate(prompts):
      tokens[i, p_len - len(prompt):] = prompt
      valid[i, p_len - len(prompt):] = True
    logits, cache, kv_valid, positions = self._prefill(self.params, jnp.asarray(tokens),
                                                       jnp.asarray(valid), self.init_cache(b, s))
    seen = None
    if sampling.repetition_penalty != 1.0:
      seen = np.zeros((b, self.cfg.vocab_size), bool)
      for i, prompt in enumerate(prompts):
        seen[i, prompt] = True
      seen = jnp.asarray(seen)
    carry = dict(cache=cache, kv_valid=kv_valid, slot=jnp.int32(p_len), positions=positions,
                 logits=logits, rng=jax.random.key(seed), seen=seen)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for step in range(max_tokens):
      carry, token_B = self._step(self.params, carry, sampling=sampling)
      token_B = np.asarray(token_B)
      for i in range(b):
        if not done[i]:
          if eos_id is not None and token_B[i] == eos_id:
            done[i] = True
          else:
            out[i].append(int(token_B[i]))
      if on_token is not None:
        on_token(step, token_B, done.copy())
      if done.all():
        break
    return out


def generate(config, params, tokenizer, prompt: str | list[str], max_tokens: int = 200,
             sampling: SamplingParams = SamplingParams(), seed: int = 0, stream=None):
  """Text continuation(s) of `prompt` (a string or a list of strings); stops at EOS.
  With `stream` (a file), a single prompt's text is written as it is generated."""
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  ids = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
  decoder = Decoder(config.model, params)
  printed = [""]
  collected: list[int] = []

  def on_token(step, tokens_B, done_B):
    del step
    if stream is None or len(prompts) != 1 or done_B[0]:
      return
    collected.append(int(tokens_B[0]))
    text = tokenizer.decode(collected)
    stream.write(text[len(printed[0]):])
    stream.flush()
    printed[0] = text

  outs = decoder.generate(ids, max_tokens, sampling, seed, tokenizer.eos_id, on_token)
  texts = [tokenizer.decode(o) for o in outs]
  return texts[0] if isinstance(prompt, str) else texts


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, params, tokenizer = load(FLAGS.workdir)
  sys.stdout.write(FLAGS.prompt)
  sampling = SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                            top_p=FLAGS.top_p, min_p=FLAGS.min_p,
                            repetition_penalty=FLAGS.repetition_penalty)
  generate(config, params, tokenizer, FLAGS.prompt, FLAGS.max_tokens, sampling, FLAGS.seed,
           stream=sys.stdout)
  sys.stdout.write("\n")


def define_flags():
  flags.DEFINE_string("workdir", None, "A training workdir.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_tokens", 200, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Sample among the k likeliest tokens; 0 for all.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: smallest set with this much mass; 1 is off.")
  flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability; 0 is off.")
  flags.DEFINE_float("repetition_penalty", 1.0, "Penalise tokens already seen; 1 is off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
