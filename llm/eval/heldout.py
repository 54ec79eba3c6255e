"""Held-out evaluation: loss (nats/token), perplexity and bits per byte on the
validation split (the last data.val_fraction of the token stream, never trained on).
The training loop's evaluation is the objective over the same rows (its "loss" sum is
this cross-entropy).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llm.data import pipeline
from llm.data.tokenizer import Tokenizer
from llm.model import make_model, require_lm_head
from llm.model.transformer import target_nll


def nll_sums(model, params, batch, chunk_len: int = 0):
  """(sum of -log p(target) over the loss mask, number of masked-in targets); the head
  and loss in chunks of `chunk_len` positions (0: all at once)."""
  nll_BT, _ = target_nll(model, params, batch, chunk_len=chunk_len)
  return jnp.sum(nll_BT * batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def evaluate_heldout(config, params, tokenizer: Tokenizer, corpus: pipeline.Corpus,
                     batch_size: int = 8, max_batches: int = 0) -> dict:
  """loss (nats/token), perplexity and bits per byte over `corpus`'s validation rows
  (all of them, or the first max_batches x batch_size; `rows` and `val_rows` say which),
  whose targets are text to predict (llm.objectives picks the runs this measures)."""
  require_lm_head(config.model, "held-out perplexity")
  rows = corpus.val
  n_batches = len(rows) // batch_size
  if n_batches == 0:
    raise ValueError(f"the validation split has {len(rows)} rows, fewer than batch_size={batch_size}")
  if max_batches:
    n_batches = min(n_batches, max_batches)
  sums = jax.jit(functools.partial(nll_sums, make_model(config.model),
                                   chunk_len=config.train.loss_chunk))
  byte_len = tokenizer.token_byte_lengths()
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
          "bytes": int(n_bytes), "unigram_loss": corpus.unigram_loss,
          "rows": n_batches * batch_size, "val_rows": len(rows)}
