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
