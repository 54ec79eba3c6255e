"""Ragged paged attention (llm.ops.attention.paged) equals dense causal attention in NumPy
and JAX's own reference for its TPU kernel: ragged sequences in scattered pages, GQA,
windows, prefill chunks, decode tokens and padding in one flat batch. On a TPU topology
the "flash" implementation compiles to JAX's Mosaic kernel (AOT, with libtpu)."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.ops.attention.paged import paged_attention, split_kv, write_pages


def _dense(q_HE, k_LKE, v_LKE, pos, window):
  h, e = q_HE.shape
  g = h // k_LKE.shape[1]
  keys = np.arange(pos + 1)
  if window:
    keys = keys[pos - keys < window]
  out = np.zeros((h, e))
  for head in range(h):
    s = k_LKE[keys, head // g] @ q_HE[head] / np.sqrt(e)
    p = np.exp(s - s.max())
    out[head] = (p / p.sum()) @ v_LKE[keys, head // g]
  return out


def _batch(rng, n=4, kh=2, h=4, e=8, num_pages=24):
  """Three sequences' keys written through write_pages (as engine steps write them), and
  one step's queries: a 5-token prefill of seq 0, one decode token of seq 1, a 4-token
  chunk of seq 2 at positions 5-8, then padding."""
  kv_lens = [5, 13, 9]
  q_lens = [5, 1, 4]
  keys = [rng.normal(size=(L, kh, e)).astype(np.float32) for L in kv_lens]
  values = [rng.normal(size=(L, kh, e)).astype(np.float32) for L in kv_lens]
  m = 5
  free = list(rng.permutation(np.arange(1, num_pages)))
  table = np.zeros((4, m), np.int32)  # a fourth row unused; padding: page 0
  for s, L in enumerate(kv_lens):
    table[s, :-(-L // n)] = [free.pop() for _ in range(-(-L // n))]
  seq = np.concatenate([np.full(L, s) for s, L in enumerate(kv_lens)])
  pos = np.concatenate([np.arange(L) for L in kv_lens])
  kv_pages = write_pages(jnp.zeros((num_pages, n, 2 * kh, e), jnp.float32),
                         jnp.asarray(np.concatenate(keys)), jnp.asarray(np.concatenate(values)),
                         jnp.asarray(table[seq, pos // n]), jnp.asarray(pos % n))
  cu = np.array([0, 5, 6, 10, 10], np.int32)
  q = rng.normal(size=(12, h, e)).astype(np.float32)  # 2 padding tokens at the end
  args = (jnp.asarray(q), kv_pages, jnp.asarray(kv_lens + [0], np.int32), jnp.asarray(table),
          jnp.asarray(cu), jnp.asarray([3], np.int32))
  queries = [(t, s, kv_lens[s] - q_lens[s] + i) for s in range(3)
             for i, t in enumerate(range(cu[s], cu[s + 1]))]
  return args, keys, values, queries


@pytest.mark.parametrize("window,keys_per_block,queries_per_block",
                         [(None, 0, 0), (3, 0, 0), (None, 4, 2), (6, 8, 3)])
def test_paged_attention_equals_dense_attention(window, keys_per_block, queries_per_block):
  rng = np.random.default_rng(0)
  args, keys, values, queries = _batch(rng)
  q = np.asarray(args[0])
  out = np.asarray(jax.jit(lambda *a: paged_attention(
      *a, window=window, keys_per_block=keys_per_block,
      queries_per_block=queries_per_block))(*args))
  for t, s, p in queries:
    np.testing.assert_allclose(out[t], _dense(q[t], keys[s], values[s], p, window),
                               rtol=2e-5, atol=2e-5, err_msg=f"token {t}")
  np.testing.assert_array_equal(out[10:], 0.0)  # padding


def test_write_pages_interleaves_keys_and_values_as_jax_tpu_kernel_reads_them():
  """The same pages through JAX's reference for its TPU kernel give the same output."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention
  rng = np.random.default_rng(1)
  args, keys, _, _ = _batch(rng)
  k_pages, _ = split_kv(args[1])
  s0_page0 = int(args[3][0, 0])
  np.testing.assert_array_equal(np.asarray(k_pages[s0_page0, :4]), keys[0][:4])
  ours = np.asarray(paged_attention(*args, window=4))
  ref = np.asarray(ref_ragged_paged_attention(*args, sm_scale=8 ** -0.5, sliding_window=4))
  np.testing.assert_allclose(ours[:10], ref, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); the TPU AOT "
                           "compile checks Mosaic tiling and VMEM limits")
@pytest.mark.parametrize("dtype,window", [(jnp.bfloat16, None), (jnp.float32, 128)])
def test_flash_paged_attention_compiles_to_mosaic_kernel_for_v5e(dtype, window):
  """attend_paged("flash") on a 4-chip v5e mesh, heads split over "tensor": the
  Mosaic kernel per shard, no XLA fallback."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from llm.ops.attention.dispatch import attend_paged
  from llm.parallel.mesh import MESH_AXES, use_mesh

  topology = topologies.get_topology_desc("v5e:2x2", platform="tpu")
  shape = tuple(4 if a == "tensor" else 1 for a in MESH_AXES)
  mesh = Mesh(np.asarray(topology.devices).reshape(shape), MESH_AXES)
  t, h, kh, e, num_pages, n, s, m = 256, 16, 4, 128, 512, 16, 8, 64

  def step(q, k, v, kv, page, slot, kv_lens, table, cu, num_seqs):
    paged = dict(page=page, slot=slot, kv_lens=kv_lens, page_table=table, cu_q_lens=cu,
                 num_seqs=num_seqs)
    return attend_paged("flash", q, k, v, {"kv": kv}, paged, window=window)

  def arg(shape, dt, spec=P()):
    return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

  i32 = jnp.int32
  with use_mesh(mesh):
    compiled = jax.jit(step).lower(
        arg((t, h, e), dtype, P(None, "tensor")), arg((t, kh, e), dtype, P(None, "tensor")),
        arg((t, kh, e), dtype, P(None, "tensor")),
        arg((num_pages, n, 2 * kh, e), dtype, P(None, None, "tensor")), arg((t,), i32),
        arg((t,), i32), arg((s,), i32), arg((s, m), i32), arg((s + 1,), i32),
        arg((1,), i32)).compile()
  text = compiled.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"', text)) == 1
  assert "while" not in text  # the XLA implementation's loops were not compiled in
