"""Quantized storage of frozen projection kernels for QLoRA (`model.lora.base_quant`).

A quantized Projection holds "kernel_q" and "kernel_scale" instead of "kernel" and
dequantizes on the fly in its matmul (llm.model.layers.Projection):
  - "int8": symmetric per output channel, kernel_q int8 (the kernel's shape),
    scale = max |w| over the input axes / 127 (shape: the output axes);
  - "nf4": the QLoRA NormalFloat-4 code book, absmax scales per block of 64 along the
    first input axis (the whole axis when it is not a multiple of 64); two 4-bit codes
    per uint8 along that axis (kernel_q: the first input axis halved).
Leading stacked-layer axes are kept as they are. Embeddings, norms, the unembedding and
routed MoE experts stay in full precision, like the LoRA adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# model.lora.base_quant -> how frozen base kernels are stored
BASE_QUANT = ("none", "int8", "nf4")
NF4_BLOCK = 64
# The 16 NormalFloat-4 levels (Dettmers et al. 2023, QLoRA, appendix E).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Projection name -> (input axes, output axes) of its kernel (llm.model.attention/layers)
PROJECTION_AXES = {"q": (1, 2), "k": (1, 2), "v": (1, 2), "o": (2, 1),
                   "gate": (1, 1), "up": (1, 1), "down": (1, 1)}


def nf4_block(first_in: int) -> int:
  return NF4_BLOCK if first_in % NF4_BLOCK == 0 else first_in


def quantized_shapes(kind: str, kernel_shape: tuple, n_in: int) -> tuple[tuple, tuple, str]:
  """(kernel_q shape, kernel_scale shape, kernel_q dtype) of an unstacked kernel."""
  if kind == "int8":
    return tuple(kernel_shape), tuple(kernel_shape[n_in:]), "int8"
  first = kernel_shape[0]
  if first % 2:
    raise ValueError(f"nf4 packs two codes per byte along the first input axis; a kernel of "
                     f"shape {tuple(kernel_shape)} has an odd one ({first})")
  return ((first // 2,) + tuple(kernel_shape[1:]),
          (first // nf4_block(first),) + tuple(kernel_shape[1:]), "uint8")


def quantize(kernel, kind: str, n_in: int, n_lead: int = 0) -> tuple[jax.Array, jax.Array]:
  """(kernel_q, kernel_scale) of a float kernel [lead..., in..., out...]."""
  w = jnp.asarray(kernel, jnp.float32)
  if kind == "int8":
    in_axes = tuple(range(n_lead, n_lead + n_in))
    scale = jnp.max(jnp.abs(w), axis=in_axes) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.round(w / jnp.expand_dims(scale, in_axes))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale
  first = w.shape[n_lead]
  block = nf4_block(first)
  blocked = w.reshape(w.shape[:n_lead] + (first // block, block) + w.shape[n_lead + 1:])
  scale = jnp.max(jnp.abs(blocked), axis=n_lead + 1)
  scale = jnp.where(scale > 0, scale, 1.0)
  normed = blocked / jnp.expand_dims(scale, n_lead + 1)
  codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
  codes = codes.reshape(w.shape).astype(jnp.uint8)
  pairs = codes.reshape(w.shape[:n_lead] + (first // 2, 2) + w.shape[n_lead + 1:])
  low = jnp.take(pairs, 0, axis=n_lead + 1)
  high = jnp.take(pairs, 1, axis=n_lead + 1)
  return (low | (high << 4)).astype(jnp.uint8), scale


def dequantize(kernel_q, scale, kind: str, n_in: int, dtype, n_lead: int = 0):
  """The float kernel that (kernel_q, kernel_scale) stand for, in `dtype`."""
  if kind == "int8":
    in_axes = tuple(range(n_lead, n_lead + n_in))
    return (kernel_q.astype(jnp.float32) * jnp.expand_dims(scale, in_axes)).astype(dtype)
  low, high = kernel_q & 0xF, kernel_q >> 4
  codes = jnp.stack([low, high], axis=n_lead + 1)
  first = kernel_q.shape[n_lead] * 2
  codes = codes.reshape(kernel_q.shape[:n_lead] + (first,) + kernel_q.shape[n_lead + 1:])
  values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
  block = first // scale.shape[n_lead]
  values = values.reshape(kernel_q.shape[:n_lead] + (first // block, block)
                          + kernel_q.shape[n_lead + 1:])
  return (values * jnp.expand_dims(scale, n_lead + 1)).reshape(codes.shape).astype(dtype)


def _map_projections(params, key: str, fn):
  """`params` with every projection node (a PROJECTION_AXES name) holding `key` replaced
  by fn(node, n_in, n_out); everything else kept as it is."""
  def walk(node, name):
    if not isinstance(node, dict):
      return node
    if key in node and name in PROJECTION_AXES:
      return fn(node, *PROJECTION_AXES[name])
    return {k: walk(v, k) for k, v in node.items()}

  return walk(params, "")


def quantize_base(params, kind: str):
  """A float base params tree with every projection kernel (PROJECTION_AXES) replaced by
  its quantized pair; everything else is kept as it is."""
  if kind == "none":
    return params

  def one(node, n_in, n_out):
    kernel = node["kernel"]
    q, scale = quantize(kernel, kind, n_in, kernel.ndim - n_in - n_out)
    rest = {k: v for k, v in node.items() if k != "kernel"}
    return {**rest, "kernel_q": q, "kernel_scale": scale}

  return _map_projections(params, "kernel", one)


def dequantize_base(params, kind: str, dtype=jnp.float32):
  """The inverse of `quantize_base` up to the quantization error."""
  if kind == "none":
    return params

  def one(node, n_in, n_out):
    q = node["kernel_q"]
    kernel = dequantize(q, node["kernel_scale"], kind, n_in, dtype, q.ndim - n_in - n_out)
    rest = {k: v for k, v in node.items() if k not in ("kernel_q", "kernel_scale")}
    return {**rest, "kernel": kernel}

  return _map_projections(params, "kernel_q", one)
