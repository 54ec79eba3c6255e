"""LoRA adapters (`model.lora`): which projections get them, telling them apart from the
base weights, and merging them into the base.

An adapted projection (llm.model.layers.Projection) holds "kernel" plus "lora_a"
[in..., r] and "lora_b" [r, out...]; its map is x @ (kernel + alpha/r x A @ B). Training
differentiates the adapters only and updates nothing else (llm.training.step,
llm.training.optim);
generation and export use `merge`, which folds the adapters into the kernels and
returns a model config without them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import base_config, comma_list
from llm.model import quant

# what a LoRA run trains: the adapters, and a reward model's "score" head (PEFT's
# modules_to_save), which starts from scratch
ADAPTER_KEYS = ("lora_a", "lora_b", "score")
# model.lora.targets: the projections LoRA can adapt
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def targets(model_cfg) -> tuple[str, ...]:
  return tuple(comma_list(model_cfg.lora.targets))


def projection_kwargs(model_cfg, target: str) -> dict:
  """Projection arguments for the projection named `target`: an adapter if it is a
  target, a quantized kernel for every projection under QLoRA or weight-only quantized
  serving (model.weight_quant); the kernel layout."""
  lora = model_cfg.lora
  if not lora.rank:
    if model_cfg.weight_quant != "none":
      return {"base_quant": model_cfg.weight_quant, "quant_chunks": quant.SERVE_CHUNKS}
    return {"out_major": True} if model_cfg.out_major_kernels else {}
  kwargs = {} if lora.base_quant == "none" else {"base_quant": lora.base_quant}
  if target in targets(model_cfg):
    kwargs.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
  return kwargs


def trainable(params, model_cfg):
  """What the optimizer updates: the adapters of a LoRA model, else every param."""
  return split(params)[1] if model_cfg.lora.rank else params


def split(params) -> tuple[dict, dict]:
  """(base params without adapters, the adapters alone), both nested dicts."""
  if not isinstance(params, dict):
    return params, None
  base, adapters = {}, {}
  for key, value in params.items():
    if key in ADAPTER_KEYS:
      adapters[key] = value
      continue
    b, a = split(value)
    base[key] = b
    if a:
      adapters[key] = a
  return base, adapters


def join(base, adapters):
  """The inverse of `split`."""
  if not adapters:
    return base
  out = dict(base)
  for key, value in adapters.items():
    out[key] = value if key in ADAPTER_KEYS else join(base[key], value)
  return out


def _delta(a, b, kernel_shape, scale):
  """scale x A @ B shaped like the kernel (leading stacked-layer axes kept)."""
  n_lead = a.ndim + b.ndim - len(kernel_shape) - 2
  lead = a.shape[:n_lead]
  r = a.shape[-1]
  a2 = a.reshape(*lead, -1, r).astype(jnp.float32)
  b2 = b.reshape(*lead, r, -1).astype(jnp.float32)
  return (scale * jnp.matmul(a2, b2)).reshape(kernel_shape)


def merge(params, model_cfg):
  """(params with every adapter folded into its kernel, the model config without LoRA);
  a quantized base (QLoRA) is dequantized first."""
  scale = model_cfg.lora.alpha / max(model_cfg.lora.rank, 1)
  params = quant.dequantize_base(params, model_cfg.lora.base_quant,
                                 jnp.dtype(model_cfg.param_dtype))

  def fold(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" in node:
      kernel = node["kernel"]
      merged = kernel.astype(jnp.float32) + _delta(node["lora_a"], node["lora_b"],
                                                   kernel.shape, scale)
      return {"kernel": merged.astype(kernel.dtype)}
    return {k: fold(v) for k, v in node.items()}

  import ml_collections
  merged_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  merged_cfg.lora = base_config().model.lora  # LoRA off: its settings at their defaults
  return fold(params), merged_cfg


def adapter_bytes(params) -> int:
  _, adapters = split(params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters or {}))
