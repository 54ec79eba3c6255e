"""Attention on the mesh: ring attention (sequence parallel) and the flash kernel inside
shard_map against an unsharded float32 reference, and whole training runs."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.ops.attention import attend
from llm.parallel.mesh import make_mesh, use_mesh
from llm.train import train
from pallas_kernels.flash_attention import reference_attention
from tests.helpers import losses


def _mesh(**axes):
  cfg = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **axes}
  return make_mesh(cfg)


@pytest.mark.parametrize("impl,mesh_axes,n_kv_heads,window", [
    ("xla", dict(sequence=4, tensor=2), 2, None),
    ("xla", dict(sequence=8), 4, 5),
    ("flash", dict(sequence=4, data=2), 2, None),
    ("flash", dict(sequence=4, tensor=2), 1, 11),  # MQA: one K/V head cannot split 2 ways
    ("flash", dict(data=2, tensor=4), 2, None),    # no ring: the kernel per (batch, head) shard
])
def test_sharded_attention_matches_reference(impl, mesh_axes, n_kv_heads, window):
  b, t, h, e = 2, 64, 4, 16
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, t, h, e))
  k = jax.random.normal(ks[1], (b, t, n_kv_heads, e))
  v = jax.random.normal(ks[2], (b, t, n_kv_heads, e))
  w = jax.random.normal(ks[3], (b, t, h, e))
  # documents crossing chunk borders: the ring must carry segment ids with K/V
  seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 30 + [2] * 14], b, 0), jnp.int32)
  mesh = _mesh(**mesh_axes)

  def loss(q, k, v):
    out = attend(impl, q, k, v, seg, window=window, block_q=8, block_k=8)
    return jnp.sum(out * w)

  with use_mesh(mesh):
    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  ref_value, ref_grads = jax.value_and_grad(
      lambda q, k, v: jnp.sum(reference_attention(q, k, v, seg, window=window)[0] * w),
      (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()))


def test_sequence_parallel_training_matches_one_device(config, tmp_path):
  """sequence=4 (ring attention) x data=2 on 8 devices gives a 1-device run's losses."""
  config.train.update(steps=4, eval_every=4)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.mesh.update(sequence=4, data=2)
  train(config, tmp_path / "ring")
  one, ring = losses(tmp_path / "one"), losses(tmp_path / "ring")
  assert sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([ring[s] for s in one], [one[s] for s in one], rtol=2e-5)


def test_flash_training_matches_xla(config, tmp_path):
  """attention="flash" (the Pallas kernel, interpreted here) trains like "xla"; and on
  a data=2, sequence=2, tensor=2 mesh, through ring attention over kernel blocks."""
  config.train.update(steps=4, eval_every=4)
  config.model.update(flash_block_q=16, flash_block_k=16)
  train(config, tmp_path / "xla", devices=jax.devices()[:1])
  config.model.attention = "flash"
  config.mesh.update(data=2, sequence=2, tensor=2)
  train(config, tmp_path / "flash")
  xla, fl = losses(tmp_path / "xla"), losses(tmp_path / "flash")
  np.testing.assert_allclose([fl[s] for s in xla], [xla[s] for s in xla], rtol=2e-5)


@pytest.mark.parametrize("n_kv_heads,window", [(2, None), (4, 7)])
def test_cudnn_entry_passes_segments_causality_and_window_to_dot_product_attention(
    monkeypatch, n_kv_heads, window):
  """model.attention="cudnn" calls jax.nn.dot_product_attention with the segments as a
  mask, causal, and the window as a left-only local window. Run here through that call's
  XLA implementation (no GPU): forward and gradients equal the reference, on a mesh too
  (data x tensor). Cached decoding takes the XLA path, and on a CPU the entry itself is
  refused in one line."""
  from llm.ops.attention import dispatch
  b, t, h, e = 2, 48, 4, 16
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(ks[0], (b, t, h, e))
  k, v = (jax.random.normal(key, (b, t, n_kv_heads, e)) for key in ks[1:3])
  w = jax.random.normal(ks[3], (b, t, h, e))
  seg = jnp.asarray([[1] * 20 + [2] * 28, [1] * 5 + [2] * 30 + [3] * 13], jnp.int32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  want = jax.value_and_grad(lambda *a: loss(lambda q, k, v: reference_attention(
      q, k, v, seg, seg, causal=True, window=window)[0], *a), argnums=(0, 1, 2))(q, k, v)
  if jax.default_backend() == "gpu":  # cuDNN itself (bf16; benchmarks/gpu.sh kernels)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.value_and_grad(lambda *a: loss(lambda q, k, v: attend(
        "cudnn", q, k, v, seg, window=window).astype(jnp.float32), *a), argnums=(0, 1, 2))(*bf16)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
    for g, r in zip(got[1], want[1]):
      np.testing.assert_allclose(g.astype(jnp.float32), r, atol=0.1)
  else:
    with pytest.raises(ValueError, match=r"model.attention='cudnn' runs on a CUDA GPU; "
                       r"JAX's backend here is 'cpu'"):
      attend("cudnn", q, k, v, seg, window=window)
  monkeypatch.setattr(dispatch, "CUDNN_BACKEND", "xla")
  cudnn = lambda q, k, v: attend("cudnn", q, k, v, seg, window=window)  # noqa: E731
  got = jax.value_and_grad(lambda *a: loss(cudnn, *a), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, atol=2e-5)
  if len(jax.devices()) >= 8:  # 8 CPU devices here; a lent GPU is one
    with use_mesh(_mesh(data=2, tensor=2, fsdp=2)):
      np.testing.assert_allclose(jax.jit(lambda *a: loss(cudnn, *a))(q, k, v), want[0],
                                 rtol=1e-5)
  calls = []
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw))
  assert dispatch.IMPLEMENTATIONS["cudnn"](1, t, e, window, None, None, None).whole is None
  assert calls == []
