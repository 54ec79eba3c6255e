"""Evaluation: held-out loss, perplexity and bits per byte; log-likelihood scoring.

  python -m llm.evaluate --workdir=DIR [--max_batches=0 --batch_size=8]

reports on the workdir's validation split (the last data.val_fraction of the
token stream, never trained on). `Scorer` gives loglikelihood(context,
continuation) and multiple-choice answers for scoring tasks.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from llm.data import pipeline
from llm.data.tokenizer import Tokenizer
from llm.generate import load, round_up
from llm.model import make_model
from llm.train import eval_step


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """UTF-8 bytes each token stands for (byte-fallback pieces 1, control tokens 0)."""
  sp = tokenizer.sp
  out = np.zeros(tokenizer.vocab_size, np.int64)
  for i in range(tokenizer.vocab_size):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    if sp.is_byte(i):
      out[i] = 1
    else:
      out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
  return out


def evaluate_heldout(config, params, tokenizer: Tokenizer, workdir, batch_size: int = 8,
                     max_batches: int = 0) -> dict:
  """loss (nats/token), perplexity and bits per byte over the validation split."""
  corpus = pipeline.prepare(config, workdir)
  rows = corpus.val
  n_batches = len(rows) // batch_size
  if n_batches == 0:
    raise ValueError(f"the validation split has {len(rows)} rows, fewer than batch_size={batch_size}")
  if max_batches:
    n_batches = min(n_batches, max_batches)
  sums = jax.jit(functools.partial(eval_step, model=make_model(config.model)))
  byte_len = token_byte_lengths(tokenizer)
  nll = tokens = n_bytes = 0.0
  for i in range(n_batches):
    batch = [rows[j] for j in range(i * batch_size, (i + 1) * batch_size)]
    batch = {k: np.stack([r[k] for r in batch]) for k in batch[0]}
    s_nll, s_tok = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
    nll += float(s_nll)
    tokens += float(s_tok)
    n_bytes += float((byte_len[batch["targets"]] * batch["loss_mask"]).sum())
  loss = nll / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "bits_per_byte": nll / math.log(2) / max(n_bytes, 1.0), "tokens": int(tokens),
          "bytes": int(n_bytes), "unigram_loss": corpus.unigram_loss}


class Scorer:
  """Log-likelihoods of continuations given contexts, batched with right padding."""

  def __init__(self, model_cfg, params, tokenizer: Tokenizer, max_len: int, batch_size: int = 8):
    self.model, self.params, self.tok = make_model(model_cfg), params, tokenizer
    self.max_len, self.batch_size = max_len, batch_size
    self._logp = jax.jit(lambda p, t: jax.nn.log_softmax(self.model.apply({"params": p}, t), -1))

  def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether greedy decoding yields it) per pair."""
    out = []
    for start in range(0, len(pairs), self.batch_size):
      chunk = pairs[start:start + self.batch_size]
      seqs = []
      for ctx, cont in chunk:
        if not cont:
          raise ValueError("an empty continuation has no likelihood to score")
        seq = (list(ctx) + list(cont))[-(self.max_len + 1):]
        seqs.append((seq, len(cont)))
      width = round_up(max(len(s) - 1 for s, _ in seqs), 16)
      tokens = np.zeros((len(seqs), width), np.int32)
      for i, (seq, _) in enumerate(seqs):
        tokens[i, :len(seq) - 1] = seq[:-1]
      logp = np.asarray(self._logp(self.params, jnp.asarray(tokens)))
      for i, (seq, n_cont) in enumerate(seqs):
        positions = np.arange(len(seq) - 1 - n_cont, len(seq) - 1)
        targets = np.asarray(seq[len(seq) - n_cont:])
        lp = logp[i, positions]
        out.append((float(lp[np.arange(n_cont), targets].sum()),
                    bool((lp.argmax(-1) == targets).all())))
    return out

  def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    ids = [([self.tok.bos_id] + list(self.tok.encode(c)) if c else [self.tok.bos_id],
            list(self.tok.encode(x))) for c, x in pairs]
    return self.loglikelihood_ids(ids)

  def multiple_choice(self, context: str, choices: list[str], normalize: bool = False) -> int:
    """Index of the likeliest choice (per byte if `normalize`)."""
    scores = [lp for lp, _ in self.loglikelihood([(context, c) for c in choices])]
    if normalize:
      scores = [s / max(len(c.encode()), 1) for s, c in zip(scores, choices)]
    return int(np.argmax(scores))


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, params, tok = load(FLAGS.workdir)
  result = evaluate_heldout(config, params, tok, FLAGS.workdir, FLAGS.batch_size,
                            FLAGS.max_batches)
  for k, v in result.items():
    print(f"{k:>14s}: {v:.4f}" if isinstance(v, float) else f"{k:>14s}: {v:,}")
  (Path(FLAGS.workdir) / "eval.json").write_text(json.dumps(result, indent=2))


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training or converted workdir.")
  flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
  flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches; 0 for all.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
