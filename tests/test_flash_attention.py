"""Pallas flash attention (interpret mode on CPU) against a float32 reference, ahead-of-time
compilation for a real TPU where libtpu is installed, and the Triton kernels compiled and
run for real where a CUDA GPU is the default backend (JAX_PLATFORMS=cuda)."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention, make_options, reference_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Compiled for a GPU, Triton runs float32 dots on the tensor cores in tf32 (10-bit mantissa).
DEVICE_TOL = {jnp.float32: 5e-3, jnp.bfloat16: 2e-2}


def _inputs(b, t, s, h, k, e, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, e), jnp.float32).astype(dtype)
  kk = jax.random.normal(ks[1], (b, s, k, e), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, k, e), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (b, t, h, e), jnp.float32)  # a random cotangent
  return q, kk, v, w


def _segments(b, t, layout, seed=0):
  if layout == "none":
    return None
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(b):  # random document lengths, packed
    cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(t), side="right"))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6))


def _check(backend, b, t, h, k, e, dtype, layout, window, block_q, block_k, causal=True,
           s=None, offsets=(0, 0), interpret=True, softcap=None):
  s = t if s is None else s
  q, kk, v, w = _inputs(b, t, s, h, k, e, dtype)
  seg = _segments(b, t, layout)
  kv_seg = None if seg is None or s == t else _segments(b, s, layout, seed=1)
  kw = dict(causal=causal, window=window, softcap=softcap)
  pos = dict(q_offset=offsets[0], kv_offset=offsets[1])

  def flash_loss(q, kk, v):
    out = flash_attention(q, kk, v, seg, kv_seg, block_q=block_q, block_k=block_k,
                          backend=backend, interpret=interpret, **kw, **pos)
    return jnp.sum(out.astype(jnp.float32) * w), out

  def ref_loss(q, kk, v):
    out, _ = reference_attention(q.astype(jnp.float32), kk.astype(jnp.float32),
                                 v.astype(jnp.float32), seg, kv_seg, **kw, **pos)
    return jnp.sum(out * w), out

  (_, out), grads = jax.value_and_grad(flash_loss, (0, 1, 2), has_aux=True)(q, kk, v)
  (_, ref), ref_grads = jax.value_and_grad(ref_loss, (0, 1, 2), has_aux=True)(q, kk, v)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  tol = (TOL if interpret else DEVICE_TOL)[dtype]
  assert _rel_err(out, ref) <= tol, "forward"
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert _rel_err(g, r) <= tol, name


# (b, t, h, k, e, dtype, segments, window, block_q, block_k)
GPU_CASES = [
    (2, 64, 4, 4, 32, jnp.float32, "none", None, 16, 16),      # MHA, exact blocks
    (1, 100, 4, 2, 32, jnp.float32, "packed", None, 32, 16),   # GQA, length not a block multiple
    (2, 77, 8, 1, 16, jnp.float32, "packed", 19, 16, 32),      # MQA, window, ragged
    (1, 128, 6, 2, 64, jnp.bfloat16, "packed", None, 32, 32),  # bf16 GQA
    (1, 96, 4, 2, 32, jnp.bfloat16, "none", 40, 32, 16),       # bf16 window
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[:5])) +
                         f"-{jnp.dtype(c[5]).name}-{c[6]}-w{c[7]}")
def test_gpu_kernel_matches_reference(case):
  _check("gpu", *case)


TPU_CASES = [
    (1, 256, 4, 2, 64, jnp.float32, "packed", None, 64, 128),   # GQA, causal skipping
    (1, 200, 2, 1, 32, jnp.bfloat16, "packed", 70, 64, 128),   # MQA, window, ragged, bf16
]


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: f"t{c[1]}-h{c[2]}-k{c[3]}-"
                         f"{jnp.dtype(c[5]).name}-w{c[7]}")
def test_tpu_kernel_matches_reference_in_interpret_mode(case):
  _check("tpu", *case)


def test_tpu_kernel_soft_caps_in_interpret_mode():
  """Gemma 2's logit soft-cap, windowed (its local layers), forward and backward."""
  _check("tpu", 1, 256, 4, 2, 64, jnp.float32, "packed", 100, 64, 128, softcap=1.5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_offsets_cross_attention_and_empty_rows(backend):
  """Query/key chunks at different positions (as ring attention uses them), with rows
  that see no key at all: output 0 and zero gradients, like the reference."""
  _check(backend, 1, 64, 2, 1, 32, jnp.float32, "packed", None, 32, 128 if backend == "tpu" else 32,
         s=128, offsets=(64, 32))


def test_non_causal_window():
  _check("gpu", 1, 64, 2, 2, 16, jnp.float32, "none", 9, 16, 16, causal=False)


def test_bad_arguments_are_named():
  q = jnp.zeros((1, 16, 4, 8))
  k = jnp.zeros((1, 16, 3, 8))
  with pytest.raises(ValueError, match="4 query heads is not a multiple of 3"):
    flash_attention(q, k, k)
  with pytest.raises(ValueError, match="backend='cuda'; allowed"):
    make_options(16, 16, 8, backend="cuda")
  with pytest.raises(ValueError, match="window=0: must be a positive int"):
    make_options(16, 16, 8, window=0)
  with pytest.raises(ValueError, match="block_k=96 is not a multiple of 128"):
    make_options(256, 256, 8, backend="tpu", interpret=False, block_k=96)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    flash_attention(q.astype(jnp.int32), q, q)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'); the TPU AOT "
                           "compile checks Mosaic tiling and VMEM limits interpret mode cannot")
@pytest.mark.parametrize("dtype,window,softcap", [(jnp.bfloat16, None, None),
                                                  (jnp.float32, 300, None),
                                                  (jnp.bfloat16, 4096, 50.0)])
def test_tpu_kernel_compiles_for_v5e_inside_shard_map(dtype, window, softcap):
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  topology = topologies.get_topology_desc("v5e:2x2", platform="tpu")
  mesh = Mesh(np.asarray(topology.devices).reshape(2, 2), ("data", "tensor"))
  b, t, h, k, e = 4, 2048, 8, 2, 128
  q_spec, seg_spec = P("data", None, "tensor"), P("data")

  def loss(q, kk, v, seg):
    def local(q, kk, v, seg):
      out = flash_attention(q, kk, v, seg, window=window, backend="tpu", interpret=False,
                            block_q=256, block_k=512, softcap=softcap)
      return jnp.sum(out.astype(jnp.float32) ** 2)[None, None]
    parts = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, q_spec, q_spec, seg_spec),
                          out_specs=P("data", "tensor"))(q, kk, v, seg)
    return parts.sum()

  def arg(shape, dt, spec):
    return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

  compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(
      arg((b, t, h, e), dtype, q_spec), arg((b, t, k, e), dtype, q_spec),
      arg((b, t, k, e), dtype, q_spec), arg((b, t), jnp.int32, seg_spec)).compile()
  kernels = re.findall(r'custom_call_target="tpu_custom_call"', compiled.as_text())
  assert len(kernels) == 3  # forward, dq, dk/dv: all Mosaic kernels, none fell back
  assert compiled.memory_analysis().argument_size_in_bytes > 0


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a CUDA GPU: the Triton kernels compile through the CUDA "
                           "plugin and ptxas, which this CPU-only machine does not have")
@pytest.mark.parametrize("case", GPU_CASES + [
    (2, 1024, 8, 2, 128, jnp.bfloat16, "packed", None, 64, 64),  # a real size, head dim 128
    (1, 2048, 4, 4, 64, jnp.bfloat16, "none", 512, 128, 64)],     # long, windowed
    ids=lambda c: "-".join(map(str, c[:5])) + f"-{jnp.dtype(c[5]).name}-{c[6]}-w{c[7]}")
def test_gpu_kernel_compiles_and_matches_on_device(case):
  _check("gpu", *case, interpret=False)
