"""Building blocks of a Llama-family decoder: RMSNorm, RoPE, projections, SwiGLU, and
the channels through which layers hand auxiliary losses and metrics to the objective.

Parameters carry logical axis names only ("embed", "heads", "mlp", ...);
llm/parallel/rules.py maps them to mesh axes. Shape suffixes: B batch, T length,
D model width, H query heads, K key/value heads, G = H // K, E head dim, F ffn.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import quant
from llm.model.lora import projection_kwargs

DTYPES = ("float32", "bfloat16")  # model.dtype (compute) and model.param_dtype
AUX_LOSSES = "aux_losses"  # the flax collection auxiliary losses are sown into
AUX_METRICS = "aux_metrics"  # and scalars to log (averaged over layers)
AUX_UPDATES = "param_updates"  # and additive corrections to non-trained params (router bias)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Names the logical axes of an activation; a no-op outside a sharding context."""
  return nn.with_logical_constraint(x, tuple(logical_axes))


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


class RMSNorm(nn.Module):
  """x / rms(x) x scale in fp32. `plus_one` (Gemma): x / rms(x) x (1 + scale), the scale
  initialised to 0 (stored as Gemma's checkpoints store it, so conversions are exact)."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  axis_name: str = "norm"
  plus_one: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = param_with_axes(self, "scale", init, (x.shape[-1],), (self.axis_name,),
                            self.param_dtype).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def norm(cfg, name: str, **kw) -> RMSNorm:
  """The model's RMSNorm (Gemma's `1 + scale` form with model.norm_plus_one)."""
  return RMSNorm(cfg.norm_eps, name=name, plus_one=cfg.norm_plus_one, **kw)


class Projection(nn.Module):
  """A bias-free linear map `x[..., in] -> x[..., out...]` with named weight axes.

  With `lora_rank` > 0 a low-rank adapter is added (LoRA): x -> x @ A @ B x alpha/rank,
  A [in..., rank] (normal, std 1/rank) and B [rank, out...] zero-initialised (both fp32), so the
  adapted map starts equal to the base one. A and B carry the kernel's input and output
  axes, so they shard like it; the rank axis is never split. `out_major` stores the kernel
  as [out..., in...] (model.out_major_kernels: faster matrix-vector products on a CPU)."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  init_std: float
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0  # on the adapter's input, when a "dropout" rng is given
  base_quant: str = "none"  # the kernel stored quantized (llm.model.quant): QLoRA, serving
  out_major: bool = False  # the kernel stored [out..., in...]
  quant_chunks: int = 0  # a served quantized kernel: dequantized in slices (quant.chunked_matmul)
  use_bias: bool = False  # a bias [out...] added (fp32 storage as param_dtype; never quantized)

  @nn.compact
  def __call__(self, x):
    out = self._matmul(x)
    if not self.use_bias:
      return out
    n_in = len(self.in_shape)
    bias = param_with_axes(self, "bias", nn.initializers.zeros, self.out_shape,
                           self.axes[n_in:], self.param_dtype)
    return out + bias.astype(out.dtype)

  def _matmul(self, x):
    n_in = len(self.in_shape)
    shape = self.in_shape + self.out_shape
    if self.out_major:
      if self.base_quant != "none" or self.lora_rank:
        raise ValueError("out_major kernels take no adapter and are not quantized (LoRA and "
                         "QLoRA keep [in..., out...] kernels)")
      kernel = param_with_axes(self, "kernel", nn.initializers.normal(self.init_std),
                               self.out_shape + self.in_shape,
                               self.axes[n_in:] + self.axes[:n_in], self.param_dtype)
      # as one [out, in] matrix (a free reshape): with several out or in axes XLA:CPU would
      # otherwise copy the kernel into its matmul layout at every call
      n_out_flat, n_in_flat = math.prod(self.out_shape), math.prod(self.in_shape)
      x_flat = x.reshape(x.shape[:x.ndim - n_in] + (n_in_flat,)).astype(self.dtype)
      out = jax.lax.dot_general(x_flat, kernel.reshape(n_out_flat, n_in_flat).astype(self.dtype),
                                (((x_flat.ndim - 1,), (1,)), ((), ())))
      return out.reshape(out.shape[:-1] + self.out_shape)
    if self.base_quant == "none":
      kernel = param_with_axes(self, "kernel", nn.initializers.normal(self.init_std), shape,
                               self.axes, self.param_dtype)
    else:  # frozen and loaded from a pretrained base (zeros until then)
      q_shape, s_shape, q_dtype = quant.quantized_shapes(self.base_quant, shape, n_in)
      scale_axes = self.axes[n_in:] if self.base_quant == "int8" else self.axes
      kernel_q = param_with_axes(self, "kernel_q", nn.initializers.zeros, q_shape, self.axes,
                                 jnp.dtype(q_dtype))
      scale = param_with_axes(self, "kernel_scale", nn.initializers.ones, s_shape, scale_axes,
                              jnp.float32)
      out = quant.chunked_matmul(x, kernel_q, scale, self.base_quant, n_in, self.dtype,
                                 self.quant_chunks)
      if out is not None and not self.lora_rank:
        return out
      kernel = quant.dequantize(kernel_q, scale, self.base_quant, n_in, self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    x = x.astype(self.dtype)
    out = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
    if self.lora_rank:
      r = self.lora_rank
      # adapters are kept in fp32 whatever the (frozen) base's dtype
      a = param_with_axes(self, "lora_a", nn.initializers.normal(1.0 / r), self.in_shape + (r,),
                          self.axes[:n_in] + (None,), jnp.float32)
      b = param_with_axes(self, "lora_b", nn.initializers.zeros, (r,) + self.out_shape,
                          (None,) + self.axes[n_in:], jnp.float32)
      x_in = x
      if self.lora_dropout and self.has_rng("dropout"):  # training only (the step's rng)
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, x.shape)
        x_in = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
      xa = jax.lax.dot_general(x_in, a.astype(self.dtype), (contract, ((), ())))
      xab = jnp.tensordot(xa, b.astype(self.dtype), axes=1)
      out = out + (self.lora_alpha / r) * xab
    return out


def add_aux_loss(module: nn.Module, name: str, value: jax.Array) -> None:
  """Hands a scalar term (already weighted) to the objective, which adds every such
  term to the loss and logs each by `name` (e.g. an MoE load-balancing loss)."""
  module.sow(AUX_LOSSES, name, value)


def add_aux_metric(module: nn.Module, name: str, value: jax.Array) -> None:
  """Hands a scalar to log (e.g. an MoE layer's load balance); the objective logs its mean
  over layers by `name`, and it does not enter the loss."""
  module.sow(AUX_METRICS, name, value)


def add_param_update(module: nn.Module, name: str, value: jax.Array) -> None:
  """Hands the train step an additive correction to this module's param `name`, applied
  after the optimizer update (a param the gradient does not move: the MoE balancing
  bias). Summed over microbatches."""
  module.sow(AUX_UPDATES, name, value)


def apply_param_updates(params, updates):
  """params with each correction in `updates` (a tree mirroring part of params) added."""
  if not isinstance(updates, dict):
    return params + updates.astype(params.dtype)
  return {k: apply_param_updates(v, updates[k]) if k in updates else v for k, v in params.items()}


def _default_inv_freq(head_dim: int, theta):
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def _no_scaling(head_dim, theta, scaling, positions_BT):
  del scaling, positions_BT
  return _default_inv_freq(head_dim, theta), 1.0


def _linear_scaling(head_dim, theta, scaling, positions_BT):
  """Position interpolation: every frequency slowed by `factor`."""
  del positions_BT
  return _default_inv_freq(head_dim, theta) / scaling.factor, 1.0


def _dynamic_ntk_scaling(head_dim, theta, scaling, positions_BT):
  """Dynamic NTK: past `original_max_position` the base grows with the sequence, as
  transformers computes it from the largest position of the call (per row here:
  inverse frequencies [B, 1, E/2])."""
  old_len = float(scaling.original_max_position)
  seq_len_B = jnp.maximum(jnp.max(positions_BT, axis=-1).astype(jnp.float32) + 1.0, old_len)
  base_B = theta * ((scaling.factor * seq_len_B / old_len) - (scaling.factor - 1)) ** (
      head_dim / (head_dim - 2))
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (base_B[:, None, None] ** exponents), 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaling(head_dim, theta, scaling, positions_BT):
  """YaRN: high frequencies kept, low ones interpolated by `factor`, a linear ramp between
  the dimensions turning beta_fast and beta_slow times over the original context; cos and
  sin scaled by the attention factor (transformers' formula, mscale / mscale_all_dim as
  DeepSeek sets them)."""
  del positions_BT
  factor, old_len = scaling.factor, scaling.original_max_position
  if scaling.attention_factor:
    attention_factor = scaling.attention_factor
  elif scaling.mscale and scaling.mscale_all_dim:
    attention_factor = (yarn_mscale(factor, scaling.mscale) /
                        yarn_mscale(factor, scaling.mscale_all_dim))
  else:
    attention_factor = yarn_mscale(factor)

  def correction_dim(rotations):
    return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp
  inv_freq = _default_inv_freq(head_dim, theta)
  return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, attention_factor


def _llama3_scaling(head_dim, theta, scaling, positions_BT):
  """Llama-3 frequency scaling: long wavelengths slowed by `factor`, a smooth band between."""
  del positions_BT
  inv_freq = _default_inv_freq(head_dim, theta)
  factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
  old_len = scaling.original_max_position
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled), 1.0


# model.rope_scaling.type -> (head_dim, theta, scaling, positions [B, T]) -> (inverse
# frequencies [E/2] (or [B, 1, E/2]), the factor cos and sin are scaled by)
ROPE_SCALINGS = {"none": _no_scaling, "linear": _linear_scaling,
                 "dynamic": _dynamic_ntk_scaling, "yarn": _yarn_scaling,
                 "llama3": _llama3_scaling}


def rope_frequencies(head_dim: int, theta: float, scaling, positions_BT):
  """(inverse frequencies, cos/sin factor) for RoPE, rescaled per `scaling.type`
  (ROPE_SCALINGS; None: unscaled)."""
  kind = "none" if scaling is None else scaling.type
  return ROPE_SCALINGS[kind](head_dim, theta, scaling, positions_BT)


def apply_rope(x_BTNE: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array,
               cos_sin_factor: float = 1.0) -> jax.Array:
  """Rotary embedding in the rotate-half layout (as Hugging Face Llama stores weights)."""
  angles_BTE2 = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BTE2)[:, :, None, :]
  sin = jnp.sin(angles_BTE2)[:, :, None, :]
  if cos_sin_factor != 1.0:
    cos, sin = cos * cos_sin_factor, sin * cos_sin_factor
  x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNE.dtype)


# model.mlp_activation -> the gate's nonlinearity (gelu_tanh: GeGLU, Gemma's
# gelu_pytorch_tanh)
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": functools.partial(nn.gelu, approximate=True)}


class SwiGLU(nn.Module):
  """The dense gated MLP: down(act(gate(x)) * up(x)); SwiGLU (Llama), GeGLU (Gemma)."""
  cfg: object  # the model ConfigDict
  out_init_std: float
  d_ff: int = 0  # 0: cfg.d_ff

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    f = self.d_ff or c.d_ff
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    gate_BTF = Projection((c.d_model,), (f,), ("embed", "mlp"), init_std=c.init_std,
                          name="gate", **kw, **projection_kwargs(c, "gate"))(x_BTD)
    up_BTF = Projection((c.d_model,), (f,), ("embed", "mlp"), init_std=c.init_std,
                        name="up", **kw, **projection_kwargs(c, "up"))(x_BTD)
    h_BTF = constrain(ACTIVATIONS[c.mlp_activation](gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
    return Projection((f,), (c.d_model,), ("mlp", "embed"), init_std=self.out_init_std,
                      name="down", **kw, **projection_kwargs(c, "down"))(h_BTF)
