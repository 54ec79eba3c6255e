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
    check_range("temperature", self.temperature, lo=0, note="0 is greedy")
    check_range("top_k", self.top_k, lo=0, note="0 is off")
    check_range("top_p", self.top_p, lo=0, hi=1, lo_open=True, note="1 is off")
    check_range("min_p", self.min_p, lo=0, hi=1, hi_open=True, note="0 is off")
    check_range("repetition_penalty", self.repetition_penalty, lo=0, lo_open=True,
                note="1 is off")


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
