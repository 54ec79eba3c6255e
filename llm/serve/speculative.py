"""Speculative decoding for the serving engine: a cheap proposer guesses the next `k`
tokens of a decoding sequence, the target model scores all of them in one pass over the
paged cache, and the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023)
keeps a prefix of them plus one token of its own:

  draft token d_j (proposed with probability q_j(d_j)) is accepted with probability
  min(1, p_j(d_j) / q_j(d_j)), p_j being the target's distribution after the accepted
  ones (the row's own temperature, top-k, top-p, min-p); at the first rejection the
  target's token is drawn from normalise(max(p_j - q_j, 0)); when all k are accepted, a
  bonus token is drawn from p_k.

So a sampled row's tokens have exactly the target's distribution, and a greedy row's are
the target's argmax chain, whatever the proposer said. Each verification step emits 1 to
k + 1 tokens.

Proposers (PROPOSERS, `SpeculativeConfig.method`):
  ngram  prompt lookup: the tokens that followed the latest earlier occurrence of the
         sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min);
         no model, proposed on the host; q is one-hot.
  draft  a smaller model with the same tokenizer (a workdir), run k times per step with
         its own KV pages, laid out under the target's page ids so prefix caching,
         preemption and forks cover it too; it samples with the row's settings and its
         distribution is q.

Rows using penalties or a grammar never speculate (their distribution changes with
every accepted token); they run beside the others, one token at a time. vLLM's names:
`num_speculative_tokens`, `prompt_lookup_max` / `_min`, and the counters
spec_decode_num_drafts / num_draft_tokens / num_accepted_tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm.config import check_range
from llm.inference.sampling import filter_logits_rows, penalize_rows, top_logprobs
from llm.model.transformer import head_logits

# keys of one row and slot: fold_in(fold_in(key(seed), draw + slot), purpose)
_ACCEPT, _RESIDUAL, _DRAFT = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  method: str  # a PROPOSERS name
  num_speculative_tokens: int = 4  # k: draft tokens verified per step
  draft_workdir: str = ""  # method "draft": the draft model's workdir
  prompt_lookup_max: int = 4  # method "ngram": the longest suffix looked up
  prompt_lookup_min: int = 2  # and the shortest

  def __post_init__(self):
    if self.method not in PROPOSERS:
      raise ValueError(f"speculative method={self.method!r}; allowed: {', '.join(PROPOSERS)}")
    check_range("num_speculative_tokens", self.num_speculative_tokens, lo=1, hi=16)
    check_range("prompt_lookup_min", self.prompt_lookup_min, lo=1)
    check_range("prompt_lookup_max", self.prompt_lookup_max, lo=self.prompt_lookup_min,
                note="at least prompt_lookup_min")
    if self.method == "draft" and self.draft_workdir and not Path(self.draft_workdir).is_dir():
      raise ValueError(f"draft_workdir={self.draft_workdir!r} is not a directory")
    if self.method != "draft" and self.draft_workdir:
      raise ValueError(f"draft_workdir is for method='draft', not {self.method!r}")


# ------------------------------------------------------------------ device math


def target_probs(logits_SV, rows):
  """The distribution each row samples from, as probabilities [S, V]: penalties, grammar
  mask, temperature, top-k / top-p / min-p; a greedy row's is one-hot at its argmax."""
  penalised_SV = penalize_rows(logits_SV, rows["counts"], rows["seen"], rows["repetition"],
                               rows["presence"], rows["frequency"])
  penalised_SV = jnp.where(rows["allowed"], penalised_SV, -jnp.inf)
  filtered_SV = filter_logits_rows(penalised_SV, rows["temperature"], rows["top_k"],
                                   rows["top_p"], rows["min_p"])
  greedy_SV = jax.nn.one_hot(jnp.argmax(penalised_SV, axis=-1), logits_SV.shape[-1])
  return jnp.where(rows["temperature"][:, None] > 0, jax.nn.softmax(filtered_SV, axis=-1),
                   greedy_SV)


def _keys(seed_S, draw_S, slots: int, purpose: int):
  """[S, slots] keys: row s, slot j -> fold_in(fold_in(key(seed), draw + j), purpose)."""
  def row(seed, draw):
    base = jax.random.key(seed)
    return jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base, draw + j), purpose))(
        jnp.arange(slots))
  return jax.vmap(row)(seed_S, draw_S)


def _draw(keys_S, probs_SV, temperature_S):
  """A token per row from `probs_SV`: drawn where the row samples, the argmax if greedy."""
  drawn_S = jax.vmap(jax.random.categorical)(keys_S, jnp.log(probs_SV))
  return jnp.where(temperature_S > 0, drawn_S, jnp.argmax(probs_SV, axis=-1)).astype(jnp.int32)


def verify_rows(logits_SKV, rows):
  """Rejection sampling of each row's drafts. logits_SKV: the target's logits after the
  pending token and after each draft ([S, K+1, V]); rows: the ROW_FIELDS plus `drafts`
  [S, K], `n_drafts` [S] and, for a draft model, `draft_probs` [S, K, V] (else q is
  one-hot at the draft). Returns (tokens [S, K+1], emitted [S] (accepted + 1), their
  log-probabilities [S, K+1], top log-probabilities and ids [S, K+1, MAX_TOP_LOGPROBS])."""
  k1, v = logits_SKV.shape[1:]
  k = k1 - 1
  probs_SKV = jax.vmap(lambda l_SV: target_probs(l_SV, rows), in_axes=1, out_axes=1)(logits_SKV)
  drafts_SK = rows["drafts"]
  q_SKV = rows["draft_probs"] if "draft_probs" in rows else jax.nn.one_hot(drafts_SK, v)
  p_at_SK = jnp.take_along_axis(probs_SKV[:, :k], drafts_SK[..., None], axis=-1)[..., 0]
  q_at_SK = jnp.take_along_axis(q_SKV, drafts_SK[..., None], axis=-1)[..., 0]
  u_SK = jax.vmap(jax.vmap(jax.random.uniform))(
      _keys(rows["seed"], rows["draw"], k, _ACCEPT))
  live_SK = jnp.arange(k)[None, :] < rows["n_drafts"][:, None]
  accept_SK = live_SK & (u_SK * q_at_SK < p_at_SK)
  accepted_S = jnp.sum(jnp.cumprod(accept_SK.astype(jnp.int32), axis=1), axis=1)
  take = lambda x, i_S: jnp.take_along_axis(x, i_S[:, None, None], axis=1)[:, 0]  # noqa: E731
  p_SV = take(probs_SKV, accepted_S)
  rejected_S = accepted_S < rows["n_drafts"]
  q_SV = jnp.where(rejected_S[:, None], take(q_SKV, jnp.minimum(accepted_S, k - 1)), 0.0)
  residual_SV = jnp.maximum(p_SV - q_SV, 0.0)
  mass_S1 = jnp.sum(residual_SV, axis=-1, keepdims=True)
  # (no mass left only where p == q, which rejects nothing; p keeps it well defined)
  final_SV = jnp.where(mass_S1 > 0, residual_SV / jnp.where(mass_S1 > 0, mass_S1, 1.0), p_SV)
  residual_keys_S = jax.vmap(lambda row, i: row[i])(
      _keys(rows["seed"], rows["draw"], k1, _RESIDUAL), accepted_S)
  last_S = _draw(residual_keys_S, final_SV, rows["temperature"])
  slot_SK1 = jnp.arange(k1)[None, :]
  drafts_SK1 = jnp.pad(drafts_SK, ((0, 0), (0, 1)))
  tokens_SK1 = jnp.where(slot_SK1 < accepted_S[:, None], drafts_SK1,
                         jnp.where(slot_SK1 == accepted_S[:, None], last_S[:, None], 0))
  divisor_S11 = jnp.where((rows["scaled_logprobs"] > 0) & (rows["temperature"] > 0),
                          rows["temperature"], 1.0)[:, None, None]
  logprobs_SKV = jax.nn.log_softmax(logits_SKV / divisor_S11, axis=-1)
  chosen_SK1 = jnp.take_along_axis(logprobs_SKV, tokens_SK1[..., None], axis=-1)[..., 0]
  top_SKT, top_ids_SKT = top_logprobs(logprobs_SKV, jnp.any(rows["top_logprobs"] > 0))
  return tokens_SK1, accepted_S + 1, chosen_SK1, top_SKT, top_ids_SKT


def verify_head(params, model_cfg, x_TD, rows):
  """The target's head in a speculative engine: logits at each row's `window` (the
  pending token's position and its drafts'), then verify_rows."""
  h_SKD = x_TD[rows["window"]]
  logits_SKV = head_logits(params, model_cfg, h_SKD)
  return verify_rows(logits_SKV, rows)


def draft_head(params, model_cfg, x_TD, rows):
  """The draft model's head: (token [S], its distribution q [S, V]) per row, drawn with
  the row's settings and its slot's own key."""
  h_SD = x_TD[rows["sample_index"]]
  logits_SV = head_logits(params, model_cfg, h_SD)
  probs_SV = target_probs(logits_SV, rows)
  keys_S = _keys(rows["seed"], rows["draw"], 1, _DRAFT)[:, 0]
  return _draw(keys_S, probs_SV, rows["temperature"]), probs_SV


# ------------------------------------------------------------------ proposers


def lookup_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
  """Prompt lookup: up to `k` tokens that followed the latest earlier occurrence of the
  last n tokens, for the longest n in [n_min, n_max] that occurs; [] when none does."""
  t = np.asarray(tokens)
  for n in range(min(n_max, len(t) - 1), n_min - 1, -1):
    suffix = t[-n:]
    windows = np.lib.stride_tricks.sliding_window_view(t[:-1], n)  # starts 0 .. len-1-n
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    if len(hits):
      start = int(hits[-1]) + n
      return t[start:start + k].tolist()
  return []


class NgramProposer:
  """Prompt lookup (see the module docstring); proposals are made while scheduling."""

  def __init__(self, config: SpeculativeConfig, engine):
    self.config = config

  def lookahead(self, seq, k: int) -> int:
    seq.drafts = lookup_ngram(seq.tokens, k, self.config.prompt_lookup_max,
                              self.config.prompt_lookup_min)
    return len(seq.drafts)

  def propose(self, batch, spec_rows, rows, k: int):
    return {id(seq): seq.drafts for seq, _ in batch if id(seq) in spec_rows}, None

  def copy_pages(self, pairs) -> None:
    pass

  def warm_up(self) -> None:
    pass


class DraftProposer:
  """A draft model run beside the target (see the module docstring)."""

  def __init__(self, config: SpeculativeConfig, engine, draft_cfg, draft_params):
    from llm.serve.runner import ModelRunner
    target = engine.runner
    self.config, self.page_size = config, engine.pool.page_size
    self.max_num_seqs = target.max_num_seqs
    # its first pass also catches up the one token each sequence may lag by
    buckets = tuple(sorted(set(target.buckets)
                           | {engine.scheduler.max_num_batched_tokens + self.max_num_seqs}))
    self.runner = ModelRunner(draft_cfg, draft_params, target.num_pages, self.page_size,
                              self.max_num_seqs, target.pages_per_seq * self.page_size,
                              buckets, target.mesh, head=draft_head)

  def lookahead(self, seq, k: int) -> int:
    return k

  def propose(self, batch, spec_rows, rows, k: int):
    """Runs the draft model: first every speculating sequence's tokens it has not seen
    (prompt chunks, the pending token, and the last draft of the previous step when all
    were accepted), then one token per pass; returns ({id(seq): drafts}, q [S, K, V])."""
    drafts = {id(seq): [] for seq, _ in batch if id(seq) in spec_rows}
    probs = []
    todo = []  # (seq, first position, tokens) of the first pass
    for seq, n in batch:
      if not seq.speculates:
        continue
      end = seq.computed + (1 if id(seq) in spec_rows else n)
      if end > seq.draft_computed:
        todo.append((seq, seq.draft_computed, seq.tokens[seq.draft_computed:end]))
    for j in range(k):
      if j:
        todo = [(seq, seq.computed + j, [drafts[id(seq)][-1]]) for seq, _ in batch
                if id(seq) in spec_rows and spec_rows[id(seq)][1] > j]
      if not todo:
        break
      token_S, probs_SV = self._run(todo, spec_rows, rows, j)
      probs.append(probs_SV)
      for seq, start, toks in todo:
        seq.draft_computed = start + len(toks)
        if id(seq) in spec_rows and spec_rows[id(seq)][1] > j:
          drafts[id(seq)].append(int(token_S[spec_rows[id(seq)][0]]))
    s, v = self.max_num_seqs, self.runner.cfg.vocab_size
    probs += [jnp.zeros((s, v), jnp.float32)] * (k - len(probs))
    return drafts, jnp.stack(probs, axis=1)

  def _run(self, todo, spec_rows, target_rows, j: int):
    """One draft pass over `todo`; sampling rows are the target's rows (same index)."""
    total = sum(len(toks) for _, _, toks in todo)
    inputs, rows = self.runner.empty_inputs(self.runner.bucket(total))
    for name in ("temperature", "top_k", "top_p", "min_p", "seed"):
      rows[name][:] = target_rows[name]
    rows["draw"][:] = target_rows["draw"] + j
    inputs["num_seqs"][0] = len(todo)
    t = 0
    for i, (seq, start, toks) in enumerate(todo):
      n = len(toks)
      positions = np.arange(start, start + n)
      inputs["tokens"][t:t + n] = toks
      inputs["positions"][t:t + n] = positions
      inputs["page"][t:t + n] = np.asarray(seq.pages)[positions // self.page_size]
      inputs["slot"][t:t + n] = positions % self.page_size
      inputs["page_table"][i, :len(seq.pages)] = seq.pages
      inputs["kv_lens"][i] = start + n
      t += n
      inputs["cu_q_lens"][i + 1:] = t
      if id(seq) in spec_rows:
        rows["sample_index"][spec_rows[id(seq)][0]] = t - 1
    token_S, probs_SV = self.runner.run_on_device(inputs, rows)
    return np.asarray(jax.device_get(token_S)), probs_SV

  def copy_pages(self, pairs) -> None:
    self.runner.copy_pages(pairs)

  def warm_up(self) -> None:
    self.runner.warm_up()


PROPOSERS = {"ngram": NgramProposer, "draft": DraftProposer}


def verify_row_fields(config: SpeculativeConfig, vocab_size: int) -> dict:
  """The verify head's per-row inputs beyond ROW_FIELDS: {name: (shape, dtype, default)}."""
  k = config.num_speculative_tokens
  fields = {"window": ((k + 1,), np.int32, 0), "drafts": ((k,), np.int32, 0),
            "n_drafts": ((), np.int32, 0)}
  if config.method == "draft":
    fields["draft_probs"] = ((k, vocab_size), np.float32, 0.0)
  return fields


def load_draft(config: SpeculativeConfig, model_cfg, tokenizer, draft_model=None):
  """(config, params) of the draft model: `draft_model` as given, or the workdir's,
  refused in one line when its vocabulary or tokenizer is not the target's."""
  if draft_model is None:
    if not config.draft_workdir:
      raise ValueError("speculative method='draft' needs draft_workdir (or a draft_model)")
    from llm.inference import load
    draft_config, params, draft_tok = load(config.draft_workdir)
    if tokenizer is not None and draft_tok is not None:
      same = (draft_tok.vocab_size == tokenizer.vocab_size
              and all(draft_tok.token_string(i) == tokenizer.token_string(i)
                      for i in range(tokenizer.vocab_size)))
      if not same:
        raise ValueError(f"the draft model {config.draft_workdir!r} has another tokenizer "
                         "than the served model; a draft must share its tokenizer")
    draft_model = (draft_config.model, params)
  draft_cfg, params = draft_model
  if draft_cfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"the draft model's vocab_size={draft_cfg.vocab_size} is not the served "
                     f"model's {model_cfg.vocab_size}; a draft must share its tokenizer")
  return draft_cfg, params
