"""The fused, chunked head + cross-entropy against NumPy (float64) and against plain
autodiff through materialised logits, alone, sharded, and inside the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm.ops.cross_entropy import chunked_token_nll, fused_loss, n_chunks, token_nll

B, T, D, V = 3, 21, 16, 97


def _inputs(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = (jax.random.normal(k[0], (B, T, D)) * 2).astype(dtype)
  w = jax.random.normal(k[1], (D, V)).astype(dtype)
  t = jax.random.randint(k[2], (B, T), 0, V)
  mask = (jax.random.uniform(k[3], (B, T)) > 0.25).astype(jnp.float32)
  g = jax.random.normal(k[4], (B, T))
  return x, w, t, mask, g


def _numpy_nll(x, w, t):
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  return logz - np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0], logz


@pytest.mark.parametrize("chunk_len", [0, 1, 4, 7, 21, 64])
def test_fused_loss_matches_numpy_and_autodiff(chunk_len):
  x, w, t, mask, _ = _inputs()
  zw = 0.01
  total, nll, z = fused_loss(x, w, t, mask, z_weight=zw, chunk_len=chunk_len)
  ref_nll, ref_logz = _numpy_nll(x, w, t)
  m = np.asarray(mask, np.float64)
  np.testing.assert_allclose(float(nll), (ref_nll * m).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(z), (ref_logz ** 2 * m).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(total), (m * (ref_nll + zw * ref_logz ** 2)).sum(), rtol=1e-5)

  def plain(x, w):  # autodiff through the whole logits
    nll_BT, logz_BT = token_nll(jnp.dot(x, w, preferred_element_type=jnp.float32), t)
    return jnp.sum(mask * (nll_BT + zw * jnp.square(logz_BT)))

  fused = lambda x, w: fused_loss(x, w, t, mask, z_weight=zw, chunk_len=chunk_len)[0]  # noqa
  for got, want in zip(jax.jit(jax.grad(fused, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # a scaled cotangent scales the gradient (the forward pass computed it for 1)
  got = jax.grad(lambda x: 3.0 * fused(x, w))(x)
  np.testing.assert_allclose(got, 3.0 * jax.grad(plain)(x, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_len", [0, 5, 8])
def test_chunked_token_nll_matches_numpy_and_autodiff(chunk_len):
  x, w, t, _, g = _inputs()
  nll, logz = chunked_token_nll(x, w, t, chunk_len=chunk_len)
  ref_nll, ref_logz = _numpy_nll(x, w, t)
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logz, ref_logz, rtol=1e-5, atol=1e-5)

  def objective(nll_logz):  # any function of both outputs: arbitrary cotangents
    nll, logz = nll_logz
    return jnp.sum(g * nll + jnp.sin(nll) * 0.5 + 0.1 * jnp.square(logz))

  plain = lambda x, w: objective(token_nll(jnp.dot(x, w), t))  # noqa: E731
  chunked = lambda x, w: objective(chunked_token_nll(x, w, t, chunk_len=chunk_len))  # noqa
  for got, want in zip(jax.jit(jax.grad(chunked, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_hidden_and_head_give_fp32_losses_and_input_dtype_grads():
  x, w, t, mask, _ = _inputs(jnp.bfloat16)
  fused = lambda x, w: fused_loss(x, w, t, mask, chunk_len=8)[0]  # noqa: E731
  plain = lambda x, w: jnp.sum(mask * token_nll(  # noqa: E731
      jnp.dot(x, w, preferred_element_type=jnp.float32), t)[0])
  assert fused(x, w).dtype == jnp.float32
  np.testing.assert_allclose(float(fused(x, w)), float(plain(x, w)), rtol=1e-5)
  gx, gw = jax.grad(fused, (0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  rx, rw = jax.grad(plain, (0, 1))(x, w)
  for got, want in ((gx, rx), (gw, rw)):  # equal up to bf16 rounding (1 ulp: 2^-8 relative)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(got - want) <= 5e-3 * np.linalg.norm(want)


def test_sharded_over_batch_sequence_and_vocab_matches_unsharded():
  import ml_collections

  from llm.parallel.mesh import make_mesh, use_mesh
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, expert=1, fsdp=1, tensor=2,
                                                  sequence=2)), jax.devices()[:8])
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (4, 16, D))
  w = jax.random.normal(k[1], (D, 96))
  t = jax.random.randint(k[2], (4, 16), 0, 96)
  mask = jnp.ones((4, 16))
  f = lambda x, w: fused_loss(x, w, t, mask, z_weight=1e-3, chunk_len=4)[0]  # noqa: E731
  want = jax.value_and_grad(f, (0, 1))(x, w)
  with use_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "sequence", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    got = jax.jit(jax.value_and_grad(f, (0, 1)))(xs, ws)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_bad_chunk_length_and_shapes_are_refused():
  with pytest.raises(ValueError, match="-1"):
    n_chunks(16, -1)
  assert n_chunks(16, 0) == 1 and n_chunks(16, 5) == 4
  x, w, t, mask, _ = _inputs()
  with pytest.raises(ValueError, match="do not fit"):
    fused_loss(x, w.T, t, mask)
  from llm.config import base_config, validate
  cfg = base_config()
  cfg.train.loss_chunk = -2
  with pytest.raises(ValueError, match="train.loss_chunk=-2"):
    validate(cfg)


def test_train_step_is_the_same_for_any_chunking(config, tmp_path):
  from tests.test_train import _setup, _step
  config.train.z_loss = 1e-3
  model, tx, state, batch = _setup(config, tmp_path)
  assert float(jnp.mean(batch["loss_mask"])) < 1  # document boundaries are masked out
  results = {}
  for chunk in (0, 7):  # one chunk; chunks of 7 positions (the last one padded)
    config.train.loss_chunk = chunk
    results[chunk] = _step(config, model, tx)(state, batch)
  (one, m1), (many, m7) = results[0], results[7]
  for name in ("loss", "z_loss", "grad_norm", "objective"):
    np.testing.assert_allclose(m7[name], m1[name], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), many.params, one.params)
