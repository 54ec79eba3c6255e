"""Sampling text from a trained workdir.

  python -m llm.generate --workdir=DIR --prompt="ROMEO:" [--max_tokens=200 --temperature=0.8 --top_k=40]

Loads DIR/config.json, the latest checkpoint's params and DIR's tokenizer, and
streams tokens to the console. Each token is one jitted full forward over a
fixed-size buffer (static shapes, compiled once).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from llm.checkpoint import load_params
from llm.data.tokenizer import Tokenizer, check_vocab
from llm.model import make_model


def load(workdir: str | Path):
  """(config, params, tokenizer) of the latest checkpoint in `workdir` (see load_params)."""
  config, params = load_params(workdir)
  tok = Tokenizer(config.data.tokenizer_path or Path(workdir) / "tokenizer.model")
  check_vocab(tok, config.model.vocab_size)
  return config, params, tok


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def _next_token(params, tokens_1T, length, rng, temperature, *, model, top_k: int):
  logits_V = model.apply({"params": params}, tokens_1T)[0, length - 1]
  if top_k > 0:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  greedy = jnp.argmax(logits_V)
  sampled = jax.random.categorical(rng, logits_V / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(config, params, tokenizer, prompt: str, max_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0, stream=None) -> str:
  """Samples up to `max_tokens` after `prompt`; stops at EOS. Returns the continuation."""
  model = make_model(config.model)
  ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  window = config.data.seq_len
  buffer = len(ids) + max_tokens
  rng = jax.random.key(seed)
  out: list[int] = []
  printed = ""
  for _ in range(max_tokens):
    context = (ids + out)[-window:] if buffer > window else ids + out
    size = min(buffer, window)
    tokens = jnp.zeros((1, size), jnp.int32).at[0, :len(context)].set(jnp.array(context))
    rng, key = jax.random.split(rng)
    token = int(_next_token(params, tokens, len(context), key, temperature, model=model,
                            top_k=min(top_k, config.model.vocab_size)))
    if token == tokenizer.eos_id:
      break
    out.append(token)
    if stream is not None:
      text = tokenizer.decode(out)
      stream.write(text[len(printed):])
      stream.flush()
      printed = text
  return tokenizer.decode(out)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, params, tokenizer = load(FLAGS.workdir)
  sys.stdout.write(FLAGS.prompt)
  generate(config, params, tokenizer, FLAGS.prompt, FLAGS.max_tokens, FLAGS.temperature,
           FLAGS.top_k, FLAGS.seed, stream=sys.stdout)
  sys.stdout.write("\n")


def define_flags():
  flags.DEFINE_string("workdir", None, "A training workdir.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_tokens", 200, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Sample among the k likeliest tokens; 0 for all.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
