"""The fused, chunked distillation divergences against TRL 1.16's
GKDTrainer.generalized_jsd_loss (values and gradients), for forward KL, reverse KL and JSD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.ops.divergence import generalized_jsd

torch = pytest.importorskip("torch")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (1.0, 0.9), (0.5, 1.0), (0.1, 0.7)])
def test_values_and_gradients_are_trls(beta, temperature):
  rng = np.random.default_rng(0)
  b, t, d, e, v = 2, 8, 6, 10, 50  # a teacher wider than the student, one vocabulary
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  tx = rng.normal(size=(b, t, e)).astype(np.float32)
  tw = rng.normal(size=(e, v)).astype(np.float32) * 0.5
  mask = np.ones((b, t), np.float32)
  mask[1, 5:] = 0.0
  labels = torch.where(torch.tensor(mask) > 0, 1, -100)

  def ours(x_):
    per_token = generalized_jsd(x_, jnp.asarray(w), jnp.asarray(tx), jnp.asarray(tw), beta=beta,
                                temperature=temperature, chunk_len=4)
    return jnp.sum(per_token * mask) / jnp.sum(mask)

  value, grad = jax.value_and_grad(ours)(jnp.asarray(x))
  x_torch = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  student = x_torch @ torch.tensor(w, dtype=torch.float64)
  teacher = torch.tensor(tx, dtype=torch.float64) @ torch.tensor(tw, dtype=torch.float64)
  theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                               temperature=temperature)
  theirs.backward()
  np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), x_torch.grad.numpy(), rtol=1e-4, atol=1e-6)
  # chunking changes nothing; the teacher gets no gradient
  whole = generalized_jsd(jnp.asarray(x), jnp.asarray(w), jnp.asarray(tx), jnp.asarray(tw),
                          beta=beta, temperature=temperature)
  chunked = generalized_jsd(jnp.asarray(x), jnp.asarray(w), jnp.asarray(tx), jnp.asarray(tw),
                            beta=beta, temperature=temperature, chunk_len=3)  # (padded)
  np.testing.assert_allclose(np.asarray(whole), np.asarray(chunked), rtol=1e-5, atol=1e-7)
  teacher_grad = jax.grad(lambda a: jnp.sum(generalized_jsd(
      jnp.asarray(x), jnp.asarray(w), a, jnp.asarray(tw), beta=beta)))(jnp.asarray(tx))
  assert not np.any(np.asarray(teacher_grad))


def test_a_mismatched_vocabulary_is_refused():
  with pytest.raises(ValueError, match="vocabulary 50 and teacher .* with 60 differ"):
    generalized_jsd(jnp.zeros((1, 4, 3)), jnp.zeros((3, 50)), jnp.zeros((1, 4, 5)),
                    jnp.zeros((5, 60)), beta=0.5)
