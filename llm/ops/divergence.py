"""Per-token divergences between a student's and a teacher's next-token distributions over
the full vocabulary, with both heads fused in, in chunks of positions, so that the [B, T,
V] logits never exist whole (for distillation: GKD's generalised Jensen-Shannon family).

`generalized_jsd(x_BTD, w_DV, teacher_x_BTE, teacher_w_EV, ...)` -> [B, T]: for beta = 0
the forward KL(teacher || student), for beta = 1 the reverse KL(student || teacher), else
beta KL(teacher || M) + (1 - beta) KL(student || M) with the mixture M = (1 - beta)
student + beta teacher; both distributions of logits / temperature (TRL's
GKDTrainer.generalized_jsd_loss, before its masking and reduction). The teacher gets no
gradient. Each chunk is rematerialised in the backward pass, so memory holds one chunk of
[B, chunk, V] logits at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.ops.softcap import soft_cap


def jsd_from_logits(student_BcV, teacher_BcV, beta: float, temperature: float = 1.0):
  """[B, c] divergences of two sets of logits (see the module docstring), in float32."""
  s = jax.nn.log_softmax(student_BcV.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_BcV.astype(jnp.float32) / temperature, axis=-1)
  kl = lambda p, q: jnp.sum(jnp.exp(p) * (p - q), axis=-1)  # noqa: E731  KL(p || q), logs
  if beta == 0:
    return kl(t, s)
  if beta == 1:
    return kl(s, t)
  m = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
  return beta * kl(t, m) + (1 - beta) * kl(s, m)


def generalized_jsd(x_BTD, w_DV, teacher_x_BTE, teacher_w_EV, *, beta: float,
                    temperature: float = 1.0, chunk_len: int = 0, softcap: float = 0.0,
                    teacher_softcap: float = 0.0):
  """[B, T] per-position divergences of the student's head (`x_BTD @ w_DV`) from the
  teacher's (`teacher_x_BTE @ teacher_w_EV`), `chunk_len` consecutive positions at a time
  (0: all; the last chunk padded). Each head's logits are soft-capped by its own cap
  (0 = none; Gemma 2's final_logit_softcapping)."""
  b, t, _ = x_BTD.shape
  if teacher_x_BTE.shape[:2] != (b, t) or w_DV.shape[1] != teacher_w_EV.shape[1]:
    raise ValueError(f"student [B, T] {(b, t)} with vocabulary {w_DV.shape[1]} and teacher "
                     f"{teacher_x_BTE.shape[:2]} with {teacher_w_EV.shape[1]} differ")
  teacher_x_BTE = jax.lax.stop_gradient(teacher_x_BTE)
  teacher_w_EV = jax.lax.stop_gradient(teacher_w_EV)
  chunk = t if not chunk_len or chunk_len >= t else chunk_len
  n = -(-t // chunk)
  if n * chunk != t:  # padded positions (zero states) are cut off again below
    pad = [(0, 0), (0, n * chunk - t), (0, 0)]
    x_BTD, teacher_x_BTE = jnp.pad(x_BTD, pad), jnp.pad(teacher_x_BTE, pad)

  @jax.checkpoint
  def one(x_BcD, tx_BcE):
    student = jnp.einsum("bcd,dv->bcv", x_BcD, w_DV, preferred_element_type=jnp.float32)
    teacher = jnp.einsum("bce,ev->bcv", tx_BcE, teacher_w_EV,
                         preferred_element_type=jnp.float32)
    return jsd_from_logits(soft_cap(student, softcap), soft_cap(teacher, teacher_softcap),
                           beta, temperature)

  xs = x_BTD.reshape(b, n, chunk, -1).swapaxes(0, 1)
  txs = teacher_x_BTE.reshape(b, n, chunk, -1).swapaxes(0, 1)
  out_nBc = jax.lax.map(lambda pair: one(*pair), (xs, txs))
  return out_nBc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
