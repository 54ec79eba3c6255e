"""pretrain: next-token cross-entropy over documents (data.source, or token stores)."""

from __future__ import annotations

import jax.numpy as jnp

from llm.eval.heldout import evaluate_heldout
from llm.model import forward
from llm.model.transformer import unembedding
from llm.objectives.base import Objective, with_aux
from llm.ops.cross_entropy import fused_loss


def next_token(params, batch, *, model, config, rng=None):
  """Next-token cross-entropy over the loss mask, plus z-loss (train.z_loss x log^2 Z),
  with the head fused into the loss (llm.ops.cross_entropy.fused_loss).
  Metrics: loss (cross-entropy per token), z_loss (mean log^2 Z), auxiliary losses."""
  x_BTD, aux = forward(model, params, batch, rng, head=False)
  mask_BT = batch["loss_mask"]
  total, nll, z = fused_loss(x_BTD, unembedding(params, model.cfg), batch["targets"], mask_BT,
                             z_weight=config.train.z_loss, chunk_len=config.train.loss_chunk,
                             softcap=model.cfg.final_logit_softcap)
  tokens = jnp.sum(mask_BT)
  sums = {"loss": nll, "z_loss": z, "weight": tokens}
  return with_aux(total, sums, aux, tokens)


def perplexity(objective, config, params, tokenizer, workdir, batch_size: int, max_batches: int):
  """llm.evaluate of a next-token run: loss, perplexity and bits per byte over the
  validation split (llm.eval.heldout)."""
  corpus = objective.data.prepare(config, workdir, tokenizer)
  return evaluate_heldout(config, params, tokenizer, corpus, batch_size, max_batches)


OBJECTIVE = Objective(loss=next_token, heldout=perplexity)
