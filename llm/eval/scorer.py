"""Log-likelihood scoring of continuations given contexts (lm-eval style), batched with
right padding; multiple choice by the likeliest continuation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llm.data.tokenizer import Tokenizer
from llm.inference.decoder import round_up
from llm.model import make_model


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
    start = self.tok.bos_prefix() or [self.tok.eos_id]  # lm_eval's rule without a BOS
    ids = [(start + list(self.tok.encode(c)) if c else start,
            list(self.tok.encode(x))) for c, x in pairs]
    return self.loglikelihood_ids(ids)

  def multiple_choice(self, context: str, choices: list[str], normalize: bool = False) -> int:
    """Index of the likeliest choice (per byte if `normalize`)."""
    scores = [lp for lp, _ in self.loglikelihood([(context, c) for c in choices])]
    if normalize:
      scores = [s / max(len(c.encode()), 1) for s, c in zip(scores, choices)]
    return int(np.argmax(scores))


class RewardScorer:
  """A reward model's (model.head="score", train.objective="reward") score of whole
  conversations: rendered with its chat template, the score at the last token, as its
  training read it (llm.data.preference, score_last)."""

  def __init__(self, workdir, batch_size: int = 32, mesh=None):
    """`mesh`: place the params replicated on it (e.g. a training run's), else on the
    local devices."""
    from llm.inference import load
    from llm.workdir import Workdir
    head = Workdir(workdir).read_config().model.head  # refused before any weight is read
    if head != "score":
      raise ValueError(f"{workdir} is not a reward model (its model.head is {head!r}; train "
                       "one with train.objective=reward)")
    self.config, self.params, self.tok = load(workdir)
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      self.params = jax.device_put(self.params, NamedSharding(mesh, P()))
    self.model, self.batch_size = make_model(self.config.model), batch_size
    self._scores = jax.jit(lambda p, t: self.model.apply({"params": p}, t))

  def score(self, conversations: list[list[dict]]) -> np.ndarray:
    """One float per conversation (lists of {"role", "content"} messages)."""
    from llm.data import chat
    template = chat.template_for(self.config.data.chat, self.tok)
    seqs = [chat.tokenize_chat(self.tok, template, c, "last")[0] for c in conversations]
    out = np.zeros(len(seqs), np.float32)
    for start in range(0, len(seqs), self.batch_size):
      chunk = seqs[start:start + self.batch_size]
      width = round_up(max(len(s) for s in chunk), 16)
      tokens = np.zeros((len(chunk), width), np.int32)
      for i, s in enumerate(chunk):
        tokens[i, :len(s)] = s
      scores = np.asarray(self._scores(self.params, jnp.asarray(tokens)))
      out[start:start + len(chunk)] = scores[np.arange(len(chunk)), [len(s) - 1 for s in chunk]]
    return out
