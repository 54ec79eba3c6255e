"""Token cross-entropy: the one implementation every loss and evaluation uses.

A language model's head and its cross-entropy dominate a small model's step and a big
vocabulary's memory: the logits [B, T, V] in fp32 (at batch 8 x 2048 x 32000 per chip,
2 GiB) and their gradient, written and read several times. Here the head and the loss are
fused and computed in chunks of positions, so only one chunk of logits [B, c, V] exists
at a time, in both passes:

  - `fused_loss` returns the masked sum of -log p(target) + z_weight x log^2 Z, the
    scalar a pretraining or SFT step minimises. Its forward pass computes the gradient
    with respect to the hidden states and the head as it goes (the softmax of each chunk
    is at hand; the gradient is (weight (1 + 2 z_weight log Z)) softmax - weight onehot),
    and its backward pass only scales it: no logits are recomputed.
  - `chunked_token_nll` returns (-log p(target), log Z) per position for objectives that
    go on computing with them (DPO, GRPO, reference log-probabilities, evaluation); its
    backward pass recomputes each chunk's logits for any cotangents.

Chunks take every n-th position (chunk j holds positions j, j + n, ...), so a sequence
axis sharded into contiguous blocks stays sharded the same way inside every chunk.
`token_nll` is the same quantity from materialised logits (the reference the tests and
benchmarks compare against; `train.loss_chunk=0` is one chunk of the fused path).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.ops.softcap import soft_cap, soft_cap_grad

F32 = jnp.float32


def token_nll(logits_BTV, targets_BT):
  """(-log p(target), log Z) per position, in fp32, from logits."""
  logits_BTV = logits_BTV.astype(F32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - target_logit_BT, logz_BT


def n_chunks(seq_len: int, chunk_len: int) -> int:
  """Chunks of at most `chunk_len` positions per row covering `seq_len` (0: one chunk)."""
  if chunk_len < 0:
    raise ValueError(f"loss chunk length {chunk_len} must be >= 0 (0 = one chunk)")
  return 1 if chunk_len == 0 else -(-seq_len // chunk_len)


def _split(a_BT, n: int):
  """[B, T, ...] -> [n, B, c, ...], chunk j = positions j, j + n, ... (padded with zeros
  to n x c positions)."""
  b, t = a_BT.shape[:2]
  c = -(-t // n)
  if c * n != t:
    a_BT = jnp.pad(a_BT, [(0, 0), (0, c * n - t)] + [(0, 0)] * (a_BT.ndim - 2))
  return jnp.moveaxis(a_BT.reshape(b, c, n, *a_BT.shape[2:]), 2, 0)


def _join(a_nBc, t: int):
  """The inverse of _split: [n, B, c, ...] -> [B, T, ...]."""
  n, b, c = a_nBc.shape[:3]
  return jnp.moveaxis(a_nBc, 0, 2).reshape(b, n * c, *a_nBc.shape[3:])[:, :t]


class Head(NamedTuple):
  """How logits come from x @ w: soft-capped (cap x tanh(. / cap); 0 = off: Gemma 2's
  final_logit_softcapping), then divided by a temperature."""
  softcap: float = 0.0
  temperature: float = 1.0


def _logits(x_BcD, w_DV, head: Head):
  logits_BcV = soft_cap(jnp.dot(x_BcD, w_DV, preferred_element_type=F32), head.softcap)
  if head.temperature != 1.0:
    logits_BcV = logits_BcV / head.temperature
  return nn.with_logical_constraint(logits_BcV, ("batch", "length", "act_vocab"))


def _raw_grad(dlogits_BcV, logits_BcV, head: Head):
  """d loss / d (x @ w) from d loss / d logits (`_logits`' chain rule)."""
  if head.temperature == 1.0:
    return soft_cap_grad(dlogits_BcV, logits_BcV, head.softcap)
  return soft_cap_grad(dlogits_BcV / head.temperature, logits_BcV * head.temperature,
                       head.softcap)


def _is_target(targets_Bc, vocab: int):
  return jax.lax.broadcasted_iota(jnp.int32, (*targets_Bc.shape, vocab), 2) == targets_Bc[..., None]


def _softmax_stats(logits_BcV, targets_Bc):
  """(softmax, log Z, target logit) of a chunk: one exp over the chunk."""
  max_Bc = jnp.max(logits_BcV, axis=-1)
  exp_BcV = jnp.exp(logits_BcV - max_Bc[..., None])
  sum_Bc = jnp.sum(exp_BcV, axis=-1)
  target_Bc = jnp.sum(jnp.where(_is_target(targets_Bc, logits_BcV.shape[-1]), logits_BcV, 0.0), -1)
  return exp_BcV / sum_Bc[..., None], max_Bc + jnp.log(sum_Bc), target_Bc


def _head_grads(dlogits_BcV, x_BcD, w_DV):
  """(d hidden [B, c, D] in the hidden's dtype, d head [D, V] fp32) from d logits."""
  d_BcV = dlogits_BcV.astype(x_BcD.dtype)
  dx_BcD = jnp.dot(d_BcV, w_DV.T, preferred_element_type=F32).astype(x_BcD.dtype)
  dw_DV = jnp.einsum("bcd,bcv->dv", x_BcD, d_BcV, preferred_element_type=F32)
  return dx_BcD, dw_DV


def _checked(x_BTD, w_DV, targets_BT):
  if x_BTD.shape[-1] != w_DV.shape[0] or x_BTD.shape[:2] != targets_BT.shape:
    raise ValueError(f"hidden {x_BTD.shape}, head {w_DV.shape} and targets {targets_BT.shape} "
                     "do not fit: need [B, T, D], [D, V] and [B, T]")


# ---------------------------------------------------------------- the training loss

def _loss_pass(x_BTD, w_DV, targets_BT, weights_BT, z_weight, chunk_len, head, with_grads):
  n = n_chunks(x_BTD.shape[1], chunk_len)
  xs = (_split(x_BTD, n), _split(targets_BT, n), _split(weights_BT.astype(F32), n))

  def step(dw_DV, chunk):
    x_BcD, t_Bc, wt_Bc = chunk
    logits_BcV = _logits(x_BcD, w_DV, head)
    p_BcV, logz_Bc, target_Bc = _softmax_stats(logits_BcV, t_Bc)
    sums = (jnp.sum(wt_Bc * (logz_Bc - target_Bc)), jnp.sum(wt_Bc * jnp.square(logz_Bc)))
    if not with_grads:
      return dw_DV, (sums, None)
    coef_Bc = wt_Bc * (1.0 + 2.0 * z_weight * logz_Bc)
    dlogits_BcV = coef_Bc[..., None] * p_BcV - jnp.where(
        _is_target(t_Bc, p_BcV.shape[-1]), wt_Bc[..., None], 0.0)
    dx_BcD, dw = _head_grads(_raw_grad(dlogits_BcV, logits_BcV, head), x_BcD, w_DV)
    return dw_DV + dw, (sums, dx_BcD)

  dw_DV, ((nll_n, z_n), dx_nBcD) = jax.lax.scan(step, jnp.zeros(w_DV.shape, F32), xs)
  nll, z = jnp.sum(nll_n), jnp.sum(z_n)
  grads = None if not with_grads else (_join(dx_nBcD, x_BTD.shape[1]), dw_DV.astype(w_DV.dtype))
  return (nll + z_weight * z, nll, z), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_loss(x_BTD, w_DV, targets_BT, weights_BT, z_weight, chunk_len, head):
  return _loss_pass(x_BTD, w_DV, targets_BT, weights_BT, z_weight, chunk_len, head, False)[0]


def _fused_loss_fwd(x_BTD, w_DV, targets_BT, weights_BT, z_weight, chunk_len, head):
  return _loss_pass(x_BTD, w_DV, targets_BT, weights_BT, z_weight, chunk_len, head, True)


def _fused_loss_bwd(z_weight, chunk_len, head, grads, cotangents):
  g_total = cotangents[0]  # the metric outputs are stop_gradient'ed by fused_loss
  dx_BTD, dw_DV = grads
  return ((dx_BTD * g_total.astype(dx_BTD.dtype)).astype(dx_BTD.dtype),
          (dw_DV * g_total.astype(dw_DV.dtype)).astype(dw_DV.dtype), None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def fused_loss(x_BTD, w_DV, targets_BT, weights_BT, *, z_weight: float = 0.0,
               chunk_len: int = 0, softcap: float = 0.0):
  """(total, nll, z) for hidden states x [B, T, D] (after the final norm, in the compute
  dtype), the head w [D, V] and per-position weights (the loss mask): total = sum of
  weights x (-log p(target) + z_weight log^2 Z), differentiable in x and w; nll = sum
  of weights x -log p(target) and z = sum of weights x log^2 Z are metrics (no gradient
  flows through them). Chunks of `chunk_len` positions per row (0: all at once);
  `softcap`: the logits soft-capped (Head)."""
  _checked(x_BTD, w_DV, targets_BT)
  total, nll, z = _fused_loss(x_BTD, w_DV, targets_BT, weights_BT, float(z_weight),
                              int(chunk_len), Head(float(softcap)))
  return total, jax.lax.stop_gradient(nll), jax.lax.stop_gradient(z)


# ---------------------------------------------------------- per-token log-probabilities

def _nll_pass(x_BTD, w_DV, targets_BT, chunk_len, head):
  n = n_chunks(x_BTD.shape[1], chunk_len)

  def step(_, chunk):
    x_BcD, t_Bc = chunk
    _, logz_Bc, target_Bc = _softmax_stats(_logits(x_BcD, w_DV, head), t_Bc)
    return None, (logz_Bc - target_Bc, logz_Bc)

  _, (nll_nBc, logz_nBc) = jax.lax.scan(step, None, (_split(x_BTD, n), _split(targets_BT, n)))
  t = x_BTD.shape[1]
  return _join(nll_nBc, t), _join(logz_nBc, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_nll(x_BTD, w_DV, targets_BT, chunk_len, head):
  return _nll_pass(x_BTD, w_DV, targets_BT, chunk_len, head)


def _chunked_nll_fwd(x_BTD, w_DV, targets_BT, chunk_len, head):
  nll_BT, logz_BT = _nll_pass(x_BTD, w_DV, targets_BT, chunk_len, head)
  return (nll_BT, logz_BT), (x_BTD, w_DV, targets_BT, logz_BT)


def _chunked_nll_bwd(chunk_len, head, residuals, cotangents):
  x_BTD, w_DV, targets_BT, logz_BT = residuals
  g_nll_BT, g_logz_BT = (g.astype(F32) for g in cotangents)
  n = n_chunks(x_BTD.shape[1], chunk_len)

  def step(dw_DV, chunk):  # d/dlogits of nll = softmax - onehot; of log Z = softmax
    x_BcD, t_Bc, logz_Bc, g_nll_Bc, g_logz_Bc = chunk
    logits_BcV = _logits(x_BcD, w_DV, head)
    p_BcV = jnp.exp(logits_BcV - logz_Bc[..., None])
    dlogits_BcV = (g_nll_Bc + g_logz_Bc)[..., None] * p_BcV - jnp.where(
        _is_target(t_Bc, p_BcV.shape[-1]), g_nll_Bc[..., None], 0.0)
    dx_BcD, dw = _head_grads(_raw_grad(dlogits_BcV, logits_BcV, head), x_BcD, w_DV)
    return dw_DV + dw, dx_BcD

  xs = tuple(_split(a, n) for a in (x_BTD, targets_BT, logz_BT, g_nll_BT, g_logz_BT))
  dw_DV, dx_nBcD = jax.lax.scan(step, jnp.zeros(w_DV.shape, F32), xs)
  return _join(dx_nBcD, x_BTD.shape[1]), dw_DV.astype(w_DV.dtype), None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def chunked_token_nll(x_BTD, w_DV, targets_BT, *, chunk_len: int = 0, softcap: float = 0.0,
                      temperature: float = 1.0):
  """(-log p(target), log Z) per position [B, T] in fp32 from hidden states x [B, T, D]
  and the head w [D, V], one chunk of `chunk_len` positions per row at a time (0: all at
  once), differentiable in x and w (the backward pass recomputes each chunk's logits).
  p is the softmax of soft_cap(x @ w, softcap) / temperature (Head)."""
  _checked(x_BTD, w_DV, targets_BT)
  return _chunked_nll(x_BTD, w_DV, targets_BT, int(chunk_len),
                      Head(float(softcap), float(temperature)))
