"""Quantized storage of projection kernels: the frozen base of QLoRA
(`model.lora.base_quant`: int8 | nf4) and weight-only quantized inference
(`model.weight_quant`: int8 | int4, written by `python -m llm.quantize`).

A quantized Projection holds "kernel_q" and "kernel_scale" instead of "kernel" and
dequantizes on the fly in its matmul (llm.model.layers.Projection):
  - "int8": symmetric per output channel, kernel_q int8 (the kernel's shape),
    scale = max |w| over the input axes / 127 (shape: the output axes);
  - "int4": symmetric, one scale per group of INT4_GROUP (128) inputs along the last
    input axis (the whole axis when 128 does not divide it) and per output channel, as
    qwix quantizes (`qwix.quantize(w, jnp.int4, tiled_axes=...)`: scale = max |w| / 7.5,
    values in [-8, 7]); two values per uint8 along that axis, offset by 8 (kernel_q: the
    last input axis halved; scale: that axis divided by the group);
  - "nf4": the QLoRA NormalFloat-4 code book, absmax scales per block of 64 along the
    first input axis (the whole axis when it is not a multiple of 64); two 4-bit codes
    per uint8 along that axis (kernel_q: the first input axis halved).
qwix supplies int4's rounding; what it lacks here is storage: its int4 arrays are one
byte per value on a CPU and in checkpoints, so they are packed two to a byte.
Leading stacked-layer axes are kept as they are. Embeddings, norms, the unembedding and
routed MoE experts stay in full precision, like the LoRA adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llm.config import kv_cache_vectors

# model.lora.base_quant -> how frozen base kernels are stored
BASE_QUANT = ("none", "int8", "nf4")
# model.weight_quant -> how a served model's projection kernels are stored
WEIGHT_QUANT = ("none", "int8", "int4")
# model.kv_quant -> how a decode cache / the engine's KV pages store keys and values:
# int8, one f32 scale per token and head (llm.ops.attention.paged.quantize_kv)
KV_QUANT = ("none", "int8")
NF4_BLOCK = 64
INT4_GROUP = 128
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


def int4_group(last_in: int) -> int:
  return INT4_GROUP if last_in % INT4_GROUP == 0 else last_in


def quantized_shapes(kind: str, kernel_shape: tuple, n_in: int) -> tuple[tuple, tuple, str]:
  """(kernel_q shape, kernel_scale shape, kernel_q dtype) of an unstacked kernel."""
  if kind == "int8":
    return tuple(kernel_shape), tuple(kernel_shape[n_in:]), "int8"
  if kind == "int4":
    last = kernel_shape[n_in - 1]
    if last % 2:
      raise ValueError(f"int4 packs two values per byte along the last input axis; a kernel "
                       f"of shape {tuple(kernel_shape)} has an odd one ({last})")
    head, tail = tuple(kernel_shape[:n_in - 1]), tuple(kernel_shape[n_in:])
    return head + (last // 2,) + tail, head + (last // int4_group(last),) + tail, "uint8"
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
  if kind == "int4":
    try:
      import qwix
    except ImportError:
      raise ImportError("int4 quantization rounds with qwix: pip install 'llm[quantize]'") from None
    axis = n_lead + n_in - 1
    q = qwix.quantize(w, jnp.int4, tiled_axes={axis: int4_group(w.shape[axis])},
                      channelwise_axes=[i for i in range(w.ndim) if i != axis])
    return _pack_nibbles((q.qvalue.astype(jnp.int8) + 8).astype(jnp.uint8), axis), q.scale
  first = w.shape[n_lead]
  block = nf4_block(first)
  blocked = w.reshape(w.shape[:n_lead] + (first // block, block) + w.shape[n_lead + 1:])
  scale = jnp.max(jnp.abs(blocked), axis=n_lead + 1)
  scale = jnp.where(scale > 0, scale, 1.0)
  normed = blocked / jnp.expand_dims(scale, n_lead + 1)
  codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
  return _pack_nibbles(codes.reshape(w.shape).astype(jnp.uint8), n_lead), scale


def dequantize(kernel_q, scale, kind: str, n_in: int, dtype, n_lead: int = 0):
  """The float kernel that (kernel_q, kernel_scale) stand for, in `dtype`."""
  if kind == "int8":
    in_axes = tuple(range(n_lead, n_lead + n_in))
    return (kernel_q.astype(jnp.float32) * jnp.expand_dims(scale, in_axes)).astype(dtype)
  if kind == "int4":
    axis = n_lead + n_in - 1
    values = _unpack_nibbles(kernel_q, axis).astype(jnp.int8) - 8
    return _scale_groups(values.astype(jnp.float32), scale, axis).astype(dtype)
  codes = _unpack_nibbles(kernel_q, n_lead)
  values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
  return _scale_groups(values, scale, n_lead).astype(dtype)


def _pack_nibbles(codes, axis: int):
  """4-bit codes (uint8) two per byte along `axis`: even positions low, odd high."""
  pairs = codes.reshape(codes.shape[:axis] + (codes.shape[axis] // 2, 2) + codes.shape[axis + 1:])
  low, high = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
  return (low | (high << 4)).astype(jnp.uint8)


def _unpack_nibbles(packed, axis: int):
  """The inverse of _pack_nibbles: `axis` doubled."""
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)
  return codes.reshape(packed.shape[:axis] + (packed.shape[axis] * 2,) + packed.shape[axis + 1:])


def _scale_groups(values, scale, axis: int):
  """values times scale, each run of values.shape[axis] // scale.shape[axis] consecutive
  entries along `axis` sharing one scale."""
  n, groups = values.shape[axis], scale.shape[axis]
  grouped = values.reshape(values.shape[:axis] + (groups, n // groups) + values.shape[axis + 1:])
  return (grouped * jnp.expand_dims(scale, axis + 1)).reshape(values.shape)


def kv_bytes_per_token(model_cfg) -> int:
  """Bytes a KV cache holds per token (every layer): its vectors (kv_cache_vectors), each
  int8 values and an f32 scale under model.kv_quant=int8, else in the compute dtype."""
  vectors, width, _ = kv_cache_vectors(model_cfg)
  per_vector = width + 4 if model_cfg.kv_quant == "int8" else (
      width * jnp.dtype(model_cfg.dtype).itemsize)
  return model_cfg.n_layers * vectors * per_vector


def require_float_weights(model_cfg, workdir, what: str) -> None:
  """Refuses a workdir written by llm.quantize where float kernels are needed."""
  if model_cfg.weight_quant != "none":
    raise ValueError(f"{str(workdir)!r} holds {model_cfg.weight_quant} kernels (python -m "
                     f"llm.quantize); {what} its float original")


# slices of the first input axis a served quantized kernel is dequantized in (see
# chunked_matmul)
SERVE_CHUNKS = 2


def chunked_matmul(x, kernel_q, scale, kind: str, n_in: int, dtype, chunks: int):
  """x[..., in...] times the dequantized kernel [in..., out...], or None where the kernel
  does not split into `chunks` slices of its first input axis (the caller then
  dequantizes it whole). Each slice is dequantized inside a loop and its product summed:
  XLA:CPU keeps one slice's floats, where a model's kernels dequantized outside a loop
  each get a buffer of their own, allocated (page-faulted) afresh at every step. Measured
  on 24 768x3072 int8 kernels at batch 1: 5.5 ms a step, against 7.4 ms in fp32 and
  about 70 ms dequantized whole."""
  first = kernel_q.shape[0]
  groups = scale.shape[0]  # int4: grouped (n_in = 1) or per-head (n_in = 2) first axis
  x_first = x.shape[x.ndim - n_in]
  if (chunks < 2 or first % chunks or x_first % chunks
      or (kind == "int4" and groups % chunks) or kind not in ("int8", "int4")):
    return None
  lead = x.shape[:x.ndim - n_in]
  x_C = jnp.moveaxis(x.reshape(lead + (chunks, x_first // chunks) + x.shape[x.ndim - n_in + 1:]),
                     len(lead), 0)
  q_C = kernel_q.reshape((chunks, first // chunks) + kernel_q.shape[1:])
  scale_C = (scale.reshape((chunks, groups // chunks) + scale.shape[1:]) if kind == "int4"
             else jnp.broadcast_to(scale, (chunks,) + scale.shape))
  out_shape = kernel_q.shape[n_in:]
  contract = (tuple(range(len(lead), len(lead) + n_in)), tuple(range(n_in)))

  def body(acc, slices):
    x_i, q_i, scale_i = slices
    w_i = dequantize(q_i, scale_i, kind, n_in, dtype)
    return acc + jax.lax.dot_general(x_i.astype(dtype), w_i, (contract, ((), ())),
                                     preferred_element_type=jnp.float32), None

  acc, _ = jax.lax.scan(body, jnp.zeros(lead + out_shape, jnp.float32), (x_C, q_C, scale_C))
  return acc.astype(dtype)


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


# train.quantization -> (forward qtype, backward qtype) of the projections' and experts'
# matmuls in quantized training (qwix's QtProvider: weights and activations quantized
# per channel by absmax, the matmul run in that type, gradients quantized likewise)
TRAINING_QUANT = {"none": None, "int8": ("int8", "int8"),
                  "fp8": ("float8_e4m3fn", "float8_e5m2")}


def for_training(model, kind: str):
  """The model with its projection matmuls (every module under attn and mlp: q, k, v, o,
  gate, up, down, shared experts, MLA's projections and kv_b's expansion) and its routed
  experts' matmuls (dropless grouped or capacity buffers) run quantized in the forward
  and backward passes, by qwix; the attention scores, the router, the capacity dispatch
  and combine, the embedding and the LM head stay in the compute dtype. "none": the
  model itself."""
  if TRAINING_QUANT[kind] is None:
    return model
  try:
    import qwix
  except ImportError:
    raise ValueError(f"train.quantization={kind!r} trains through qwix: pip install "
                     "'llm[quantize]'") from None
  fwd, bwd = (jnp.dtype(t) for t in TRAINING_QUANT[kind])
  qtypes = dict(weight_qtype=fwd, act_qtype=fwd, bwd_qtype=bwd)
  rules = [qwix.QtRule(module_path=r".*(attn|mlp)/.+", **qtypes),  # Projections, MLA's kv_b
           # the routed experts: grouped matmuls (dropless) or per-expert buffers (capacity)
           qwix.QtRule(module_path=r".*mlp", op_names=("ragged_dot", "dot_general"), **qtypes)]
  return qwix.quantize_model(model, qwix.QtProvider(rules))

