"""Token samplers: temperature, top-k, top-p (nucleus), min-p and repetition penalty.

`filter_logits` returns the logits whose softmax is the distribution sampled
from (masked entries at -inf); `sample` draws from it with a JAX key, so a
seed reproduces the draws. temperature == 0 is greedy (argmax).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm.config import check_range


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.8
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  min_p: float = 0.0  # 0.0: off
  repetition_penalty: float = 1.0  # 1.0: off

  def __post_init__(self):
    check_sampling(self)


def check_sampling(p) -> None:
  """The ranges of the samplers' settings, for anything carrying them by these names
  (SamplingParams, a serving request's llm.serve.request.SamplingOptions)."""
  check_range("temperature", p.temperature, lo=0, note="0 is greedy")
  check_range("top_k", p.top_k, lo=0, note="0 is off")
  check_range("top_p", p.top_p, lo=0, hi=1, lo_open=True, note="1 is off")
  check_range("min_p", p.min_p, lo=0, hi=1, hi_open=True, note="0 is off")
  check_range("repetition_penalty", p.repetition_penalty, lo=0, lo_open=True, note="1 is off")


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
  """CTRL-style: logits of seen tokens are divided by `penalty` if positive, else multiplied."""
  if penalty == 1.0:
    return logits_BV
  penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalised, logits_BV)


def filter_logits(logits_BV, p: SamplingParams, seen_BV=None):
  """Logits of the distribution to sample from: penalty, temperature, then top-k/p, min-p."""
  logits_BV = logits_BV.astype(jnp.float32)
  if seen_BV is not None:
    logits_BV = apply_repetition_penalty(logits_BV, seen_BV, p.repetition_penalty)
  if p.temperature > 0:
    logits_BV = logits_BV / p.temperature
  neg_inf = jnp.float32(-jnp.inf)
  vocab = logits_BV.shape[-1]
  if 0 < p.top_k < vocab:
    kth_B1 = jax.lax.top_k(logits_BV, p.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if p.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # The smallest prefix whose mass reaches top_p: keep a token if the mass before it is < p.
    keep_count_B1 = jnp.sum(mass_before_BV < p.top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, keep_count_B1 - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  if p.min_p > 0.0:
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    threshold_B1 = p.min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    logits_BV = jnp.where(probs_BV < threshold_B1, neg_inf, logits_BV)
  return logits_BV


def sample(rng, logits_BV, p: SamplingParams, seen_BV=None):
  """One token id per row, int32 [B]."""
  if p.temperature == 0:
    if seen_BV is not None:
      logits_BV = apply_repetition_penalty(logits_BV.astype(jnp.float32), seen_BV,
                                           p.repetition_penalty)
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BV, p, seen_BV), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------- per-row settings (serving)

# the alternatives reported with `logprobs`: at most this many per token
MAX_TOP_LOGPROBS = 20


def filter_logits_rows(logits_SV, temperature_S, top_k_S, top_p_S, min_p_S):
  """filter_logits with each row's own settings (arrays [S]; a temperature of 0 is
  treated as 1 here: greedy rows take the argmax instead, see sample_rows)."""
  logits_SV = logits_SV.astype(jnp.float32)
  logits_SV = logits_SV / jnp.where(temperature_S > 0, temperature_S, 1.0)[:, None]
  neg_inf = jnp.float32(-jnp.inf)
  vocab = logits_SV.shape[-1]
  k_S = jnp.where((top_k_S > 0) & (top_k_S < vocab), top_k_S, vocab)

  def truncate(logits_SV):  # top-k, then top-p, over the sorted logits
    sorted_SV = jnp.sort(logits_SV, axis=-1)[:, ::-1]
    kth_S1 = jnp.take_along_axis(sorted_SV, (k_S - 1)[:, None], axis=-1)
    logits_SV = jnp.where(logits_SV < kth_S1, neg_inf, logits_SV)
    sorted_SV = jnp.where(jnp.arange(vocab)[None, :] < k_S[:, None], sorted_SV, neg_inf)
    probs_SV = jax.nn.softmax(sorted_SV, axis=-1)
    mass_before_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV
    keep_S1 = jnp.sum(mass_before_SV < top_p_S[:, None], axis=-1, keepdims=True)
    cutoff_S1 = jnp.take_along_axis(sorted_SV, jnp.maximum(keep_S1, 1) - 1, axis=-1)
    return jnp.where((top_p_S[:, None] < 1.0) & (logits_SV < cutoff_S1), neg_inf, logits_SV)

  # the sort only when some row truncates (it is most of a small model's sampling time)
  logits_SV = jax.lax.cond(jnp.any((k_S < vocab) | (top_p_S < 1.0)), truncate, lambda x: x,
                           logits_SV)
  probs_SV = jax.nn.softmax(logits_SV, axis=-1)
  threshold_S1 = min_p_S[:, None] * jnp.max(probs_SV, axis=-1, keepdims=True)
  return jnp.where(probs_SV < threshold_S1, neg_inf, logits_SV)


def penalize_rows(logits_SV, counts_SV, seen_SV, repetition_S, presence_S, frequency_S):
  """OpenAI's presence and frequency penalties over the tokens generated so far
  (`counts_SV`), then the CTRL repetition penalty over every token seen, prompt included
  (`seen_SV`), each with the row's own strength (1, 0, 0: off)."""
  logits_SV = logits_SV.astype(jnp.float32)
  logits_SV = (logits_SV - presence_S[:, None] * (counts_SV > 0)
               - frequency_S[:, None] * counts_SV)
  rep_S1 = repetition_S[:, None]
  penalised = jnp.where(logits_SV > 0, logits_SV / rep_S1, logits_SV * rep_S1)
  return jnp.where(seen_SV, penalised, logits_SV)


def sample_rows(keys_S, logits_SV, rows: dict):
  """(token [S] int32, its log-probability [S], top log-probabilities [S, MAX_TOP_LOGPROBS]
  and their ids) with each row's settings in `rows` (arrays [S]: temperature, top_k,
  top_p, min_p, repetition, presence, frequency, top_logprobs (alternatives wanted);
  counts [S, V] and seen [S, V]; allowed [S, V]: the tokens a row's grammar allows) and its
  own key, so a row's draw does not depend on the others. Log-probabilities are the
  model's, before penalties and filtering (as vLLM reports them); a row with
  `scaled_logprobs` set gets those of logits / its temperature instead (when positive), as
  an RL trainer scores its samples (llm.training.samplers)."""
  divisor_S1 = jnp.where((rows["scaled_logprobs"] > 0) & (rows["temperature"] > 0),
                         rows["temperature"], 1.0)[:, None]
  logprobs_SV = jax.nn.log_softmax(logits_SV.astype(jnp.float32) / divisor_S1, axis=-1)
  penalised_SV = penalize_rows(logits_SV, rows["counts"], rows["seen"], rows["repetition"],
                               rows["presence"], rows["frequency"])
  penalised_SV = jnp.where(rows["allowed"], penalised_SV, -jnp.inf)

  def draw(penalised_SV):
    filtered_SV = filter_logits_rows(penalised_SV, rows["temperature"], rows["top_k"],
                                     rows["top_p"], rows["min_p"])
    return jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys_S, filtered_SV)

  greedy_S = jnp.argmax(penalised_SV, axis=-1)
  # a batch of greedy rows skips the sort and the draws
  drawn_S = jax.lax.cond(jnp.any(rows["temperature"] > 0), draw, lambda _: greedy_S,
                         penalised_SV)
  token_S = jnp.where(rows["temperature"] > 0, drawn_S, greedy_S).astype(jnp.int32)
  chosen_S = jnp.take_along_axis(logprobs_SV, token_S[:, None], axis=-1)[:, 0]
  top_SK, top_ids_SK = top_logprobs(logprobs_SV, jnp.any(rows["top_logprobs"] > 0))
  return token_S, chosen_S, top_SK, top_ids_SK


def top_logprobs(logprobs_XV, wanted):
  """The MAX_TOP_LOGPROBS largest log-probabilities over the last axis and their ids
  (int32), computed only when `wanted` (a traced bool; zeros otherwise); a vocabulary
  smaller than that pads with -inf and id 0."""
  k = min(MAX_TOP_LOGPROBS, logprobs_XV.shape[-1])
  pad = [(0, 0)] * (logprobs_XV.ndim - 1) + [(0, MAX_TOP_LOGPROBS - k)]
  shape = logprobs_XV.shape[:-1] + (MAX_TOP_LOGPROBS,)

  def top(x):
    values, ids = jax.lax.top_k(x, k)
    return (jnp.pad(values, pad, constant_values=-jnp.inf),
            jnp.pad(ids.astype(jnp.int32), pad))

  return jax.lax.cond(wanted, top, lambda x: (jnp.zeros(shape, x.dtype),
                                              jnp.zeros(shape, jnp.int32)), logprobs_XV)
