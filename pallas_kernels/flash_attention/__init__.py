"""Flash attention with hand-written backward passes: TPU (Mosaic) and GPU (Triton) kernels.

    out_BTHE = flash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, causal=True)

Inputs are bf16 or fp32 in the model's layout (query heads H a multiple of key/value
heads K: MHA, GQA, MQA); accumulation is fp32. Lengths need not be multiples of the
blocks (inputs are padded, padding never attends or is attended to). Segment ids
(non-negative ints) restrict attention to the same packed document. `window` keeps the
last `window` positions (Mistral-style sliding window); `softcap` soft-caps the logits,
cap x tanh(s / cap) (Gemma 2). The backward pass is three
Pallas kernels (dq; dk and dv together) fed by the forward's logsumexp.

`block_fwd` / `block_bwd` expose one (query chunk, key chunk) step with position
offsets and an externally supplied logsumexp, which is what ring attention needs.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.common import (EMPTY_LSE, PAD_KV_SEGMENT, PAD_Q_SEGMENT,
                                                   Options, attention_mask, match_vma)
from pallas_kernels.flash_attention.reference import reference_attention

__all__ = ["flash_attention", "make_options", "force_backend", "block_fwd", "block_bwd",
           "output_delta", "reference_attention", "attention_mask", "match_vma", "Options",
           "BACKENDS", "EMPTY_LSE"]

BACKENDS = ("tpu", "gpu")
_DEFAULT_BLOCKS = {"tpu": (512, 512), "gpu": (64, 64)}


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"flash attention backend={backend!r}; allowed: {BACKENDS}")


_FORCED: list[tuple[str, bool]] = []


@contextlib.contextmanager
def force_backend(backend: str, interpret: bool = False):
  """Within this block the default backend is `backend` (e.g. compiling ahead of time
  for a TPU topology from a CPU host, where the local default would interpret)."""
  _check_backend(backend)
  _FORCED.append((backend, interpret))
  try:
    yield
  finally:
    _FORCED.pop()


def default_backend() -> tuple[str, bool]:
  """(kernel family, interpret): the device's own kernel; on a CPU the Triton kernel's
  programs run by the generic Pallas interpreter, which is plain JAX (fast, and fine
  under shard_map; the TPU interpreter simulates one chip and is for kernel tests)."""
  if _FORCED:
    return _FORCED[-1]
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu", False
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu", False
  return "gpu", True


def make_options(q_len: int, kv_len: int, head_dim: int, *, causal: bool = True,
                 window: int | None = None, scale: float | None = None,
                 block_q: int | None = None, block_k: int | None = None,
                 backend: str | None = None, interpret: bool | None = None,
                 num_warps: int | None = None, num_stages: int | None = None,
                 softcap: float | None = None) -> Options:
  """Validated static options; block sizes default per backend, capped to the lengths.
  num_warps / num_stages tune the Triton (GPU) launch; None picks by head dim."""
  auto_backend, auto_interpret = default_backend()
  backend = auto_backend if backend is None else backend
  _check_backend(backend)
  interpret = (auto_interpret if backend == auto_backend else True) if interpret is None else interpret
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window={window!r}: must be a positive int (keys within `window` "
                     "positions of the query) or None")
  default_q, default_k = _DEFAULT_BLOCKS[backend]
  # TPU tiles are (8k, 128k); Triton blocks are powers of two.
  q_quantum, k_quantum = (8, 128) if backend == "tpu" else (16, 16)
  if backend == "gpu":
    cap_q, cap_k = (max(16, 1 << (n - 1).bit_length()) for n in (q_len, kv_len))
  else:
    cap_q, cap_k = _round_up(q_len, q_quantum), _round_up(kv_len, k_quantum)
  block_q = min(default_q, cap_q) if block_q is None else block_q
  block_k = min(default_k, cap_k) if block_k is None else block_k
  for name, value, quantum in (("block_q", block_q, q_quantum), ("block_k", block_k, k_quantum)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}: must be a positive int")
    if not interpret and value % quantum:
      raise ValueError(f"{name}={value} is not a multiple of {quantum}, which the {backend} "
                       "kernel's tiles require")
    if backend == "gpu" and not interpret and value & (value - 1):
      raise ValueError(f"{name}={value}: Triton blocks must be powers of two")
  for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name}={value!r}: must be a positive int or None")
  if softcap is not None and (isinstance(softcap, bool) or not softcap > 0):
    raise ValueError(f"softcap={softcap!r}: must be a positive number (logits cap x "
                     "tanh(s / cap)) or None")
  scale = head_dim ** -0.5 if scale is None else float(scale)
  return Options(causal=bool(causal), window=window, scale=scale, block_q=block_q,
                 block_k=block_k, backend=backend, interpret=bool(interpret),
                 num_warps=num_warps, num_stages=num_stages,
                 softcap=None if softcap is None else float(softcap))


def _check_inputs(q, k, v, segment_ids, kv_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B, T, H, E] and k, v [B, S, K, E] of equal shape; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}")
  b, t, h, e = q.shape
  if k.shape[0] != b or k.shape[3] != e:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
  if h % k.shape[2]:
    raise ValueError(f"{h} query heads is not a multiple of {k.shape[2]} key/value heads")
  for x in (q, k, v):
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"flash attention takes float32 or bfloat16 inputs, got {x.dtype}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids shape {segment_ids.shape} != (batch, q_len) {(b, t)}")
  if kv_segment_ids is not None and kv_segment_ids.shape != (b, k.shape[1]):
    raise ValueError(f"kv_segment_ids shape {kv_segment_ids.shape} != (batch, kv_len) "
                     f"{(b, k.shape[1])}")


def _pad(x, axis: int, size: int, value=0):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _prepare(q, k, v, segment_ids, kv_segment_ids, q_offset, kv_offset, opts: Options):
  """Pads lengths to block multiples; returns padded (q, k, v, qseg, kvseg, offsets)."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  tp, sp = _round_up(t, opts.block_q), _round_up(s, opts.block_k)
  qseg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if kv_segment_ids is None:
    kvseg = qseg if s == t else jnp.zeros((b, s), jnp.int32)
  else:
    kvseg = kv_segment_ids.astype(jnp.int32)
  offsets = jnp.stack([jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32)])
  return (_pad(q, 1, tp), _pad(k, 1, sp), _pad(v, 1, sp), _pad(qseg, 1, tp, PAD_Q_SEGMENT),
          _pad(kvseg, 1, sp, PAD_KV_SEGMENT), offsets)


def _fwd_padded(q, k, v, qseg, kvseg, offsets, opts: Options):
  """Kernel forward on padded [B, T, H, E] inputs: (o_BTHE, lse_BHT)."""
  q, k, v, qseg, kvseg, offsets = match_vma(q, k, v, qseg, kvseg, offsets)
  if opts.backend == "gpu":
    return gpu.fwd(q, k, v, qseg, kvseg, offsets, opts)
  t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  o, lse = tpu.fwd(t(q), t(k), t(v), qseg[:, :, None], kvseg[:, None, :], offsets, opts)
  return t(o), lse[..., 0]


def _bwd_padded(q, k, v, qseg, kvseg, offsets, lse_BHT, delta_BHT, do, opts: Options):
  """Kernel backward on padded inputs: (dq, dk, dv)."""
  q, k, v, qseg, kvseg, offsets, lse_BHT, delta_BHT, do = match_vma(
      q, k, v, qseg, kvseg, offsets, lse_BHT, delta_BHT, do)
  if opts.backend == "gpu":
    return gpu.bwd(q, k, v, qseg, kvseg, offsets, lse_BHT, delta_BHT, do, opts)
  t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  dq, dk, dv = tpu.bwd(t(q), t(k), t(v), qseg[:, :, None], kvseg[:, None, :], offsets,
                       lse_BHT[..., None], delta_BHT[..., None], t(do), opts)
  return t(dq), t(dk), t(dv)


def output_delta(o_BTHE, do_BTHE):
  """delta = rowsum(dO * O), the softmax-backward term, as [B, H, T] float32."""
  return jnp.einsum("bthe,bthe->bht", do_BTHE.astype(jnp.float32), o_BTHE.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, qseg, kvseg, offsets, opts):
  return _fwd_padded(q, k, v, qseg, kvseg, offsets, opts)[0]


def _flash_fwd(q, k, v, qseg, kvseg, offsets, opts):
  o, lse = _fwd_padded(q, k, v, qseg, kvseg, offsets, opts)
  return o, (q, k, v, qseg, kvseg, offsets, o, lse)


def _flash_bwd(opts, residuals, do):
  q, k, v, qseg, kvseg, offsets, o, lse = residuals
  dq, dk, dv = _bwd_padded(q, k, v, qseg, kvseg, offsets, lse, output_delta(o, do), do, opts)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, kv_segment_ids_BS=None, *,
                    causal: bool = True, window: int | None = None, scale: float | None = None,
                    block_q: int | None = None, block_k: int | None = None,
                    backend: str | None = None, interpret: bool | None = None,
                    q_offset=0, kv_offset=0, num_warps: int | None = None,
                    num_stages: int | None = None, softcap: float | None = None):
  """Softmax(q k^T * scale) v under the causal / segment / window mask; differentiable.

  backend: "tpu" or "gpu"; default is the current device's, and on a CPU the GPU kernel
  in interpret mode. kv_segment_ids default to segment_ids (self-attention)."""
  _check_inputs(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_segment_ids_BS)
  opts = make_options(q_BTHE.shape[1], k_BSKE.shape[1], q_BTHE.shape[3], causal=causal,
                      window=window, scale=scale, block_q=block_q, block_k=block_k,
                      backend=backend, interpret=interpret, num_warps=num_warps,
                      num_stages=num_stages, softcap=softcap)
  padded = _prepare(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_segment_ids_BS, q_offset,
                    kv_offset, opts)
  return _flash(*padded, opts)[:, :q_BTHE.shape[1]]


def block_fwd(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_segment_ids_BS, q_offset, kv_offset,
              opts: Options):
  """One chunk pair: (out_BTHE, lse_BHT float32); rows seeing nothing give 0 and a very
  negative lse, so chunk results combine by logsumexp weights."""
  t = q_BTHE.shape[1]
  padded = _prepare(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_segment_ids_BS, q_offset,
                    kv_offset, opts)
  o, lse = _fwd_padded(*padded, opts)
  return o[:, :t], lse[:, :, :t]


def block_bwd(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_segment_ids_BS, q_offset, kv_offset,
              lse_BHT, delta_BHT, do_BTHE, opts: Options):
  """Gradients of one chunk pair given the full row logsumexp and delta."""
  t, s = q_BTHE.shape[1], k_BSKE.shape[1]
  q, k, v, qseg, kvseg, offsets = _prepare(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT,
                                           kv_segment_ids_BS, q_offset, kv_offset, opts)
  tp = q.shape[1]
  dq, dk, dv = _bwd_padded(q, k, v, qseg, kvseg, offsets, _pad(lse_BHT, 2, tp),
                           _pad(delta_BHT, 2, tp), _pad(do_BTHE, 1, tp), opts)
  return dq[:, :t], dk[:, :s], dv[:, :s]
