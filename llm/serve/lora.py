"""Many LoRA adapters over one base model, in one batch: each token of a step carries its
request's adapter, and every adapted projection adds that adapter's low-rank update.

Adapters are stacked per projection: A [L + 1, in, r] and B [L + 1, r, out] (flattened
in / out axes; slot 0 is the base itself, all zeros; ranks padded with zeros to the
largest; each adapter's alpha / r folded into its B). A projection's update for a flat
batch is x @ A[slot] @ B[slot] per token, computed for all slots at once against a
one-hot of each token's slot (L and r are small next to the base's matmuls).

The model code is untouched: the runner applies the model under `nn.intercept_methods`,
and the interceptor adds the update to the output of every Projection an adapter targets
(found by the module's path, e.g. ("layers_0", "attn", "q")).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.model import lora as lora_lib
from llm.model.layers import Projection
from llm.model.transformer import unstack_layers

# model fields an adapter's base must share with the served one (the shapes its
# updates act on)
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "mlp")


def _projection_updates(tree, path=()) -> dict[tuple, tuple]:
  """{projection path: (lora_a, lora_b)} of an unstacked params tree."""
  out = {}
  if isinstance(tree, dict):
    if "lora_a" in tree and "lora_b" in tree:
      out[path] = (tree["lora_a"], tree["lora_b"])
    for key, value in tree.items():
      if key not in lora_lib.ADAPTER_KEYS:
        out.update(_projection_updates(value, path + (key,)))
  return out


class Adapters:
  """Named adapters stacked for serving (see the module docstring). `slots` maps a name
  to its slot; "" is the base."""

  def __init__(self, base_cfg, named: dict[str, tuple]):
    """named: {name: (model config with its lora, params holding its lora_a / lora_b)}."""
    self.slots = {"": 0}
    per_adapter = []
    for name, (cfg, params) in named.items():
      if not name or name in self.slots:
        raise ValueError(f"adapter name {name!r}: names must be non-empty and distinct")
      if not cfg.lora.rank:
        raise ValueError(f"adapter {name!r} has no LoRA (model.lora.rank is 0)")
      differ = [f for f in SHAPE_FIELDS if cfg[f] != base_cfg[f]]
      if differ:
        raise ValueError(f"adapter {name!r} was trained on another model: "
                         + ", ".join(f"model.{f} {cfg[f]} vs {base_cfg[f]} served"
                                     for f in differ))
      adapters = lora_lib.split(params)[1]
      updates = _projection_updates(unstack_layers(adapters, cfg) if cfg.scan_layers
                                    else adapters)
      scale = cfg.lora.alpha / cfg.lora.rank
      per_adapter.append({path: (np.asarray(a, np.float32), np.asarray(b, np.float32) * scale)
                          for path, (a, b) in updates.items()})
      self.slots[name] = len(self.slots)
    self.rank = max((a.shape[-1] for upd in per_adapter for a, _ in upd.values()), default=0)
    paths = sorted({p for upd in per_adapter for p in upd})
    self.stacked: dict[str, tuple] = {}
    for path in paths:
      a0, b0 = next(upd[path] for upd in per_adapter if path in upd)
      n_in, n_out = math.prod(a0.shape[:-1]), math.prod(b0.shape[1:])
      a_all = np.zeros((len(self.slots), n_in, self.rank), np.float32)
      b_all = np.zeros((len(self.slots), self.rank, n_out), np.float32)
      for slot, upd in enumerate(per_adapter, start=1):
        if path in upd:
          a, b = upd[path]
          a_all[slot, :, :a.shape[-1]] = a.reshape(n_in, -1)
          b_all[slot, :b.shape[0]] = b.reshape(b.shape[0], n_out)
      self.stacked["/".join(path)] = (jnp.asarray(a_all), jnp.asarray(b_all))

  def slot(self, name: str) -> int:
    if name not in self.slots:
      raise ValueError(f"no adapter {name!r}; served: {sorted(n for n in self.slots if n)}")
    return self.slots[name]


def apply_with_adapters(stacked: dict, slot_T, fn, *args):
  """fn(*args) (a model apply over a flat batch [1, T, ...]) with each adapted Projection's
  output plus the update of each token's adapter (`slot_T` [T])."""
  onehot_TL = jax.nn.one_hot(slot_T, next(iter(stacked.values()))[0].shape[0], dtype=jnp.float32)

  def interceptor(next_fun, call_args, kwargs, context):
    out = next_fun(*call_args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, Projection):
      return out
    ab = stacked.get("/".join(module.path))
    if ab is None:
      return out
    a_LIR, b_LRO = ab
    x = call_args[0]
    n_in = len(module.in_shape)
    x_TI = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])).astype(jnp.float32)
    h_TLR = jnp.einsum("ti,lir->tlr", x_TI, a_LIR) * onehot_TL[:, :, None]
    delta_TO = jnp.einsum("tlr,lro->to", h_TLR, b_LRO)
    return out + delta_TO.reshape(out.shape).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    return fn(*args)
