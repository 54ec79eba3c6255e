"""Feed-forward layers, one per `config.model.mlp` kind.

Every kind is a flax module built as `MLPS[kind](cfg, out_init_std=..., name="mlp")`
mapping [B, T, D] -> [B, T, D]; it may hand auxiliary losses to the objective with
`layers.add_aux_loss`. Adding a kind is a class here plus one line in `MLPS`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm.model.layers import Projection, constrain


class SwiGLU(nn.Module):
  """The dense Llama MLP: down(silu(gate(x)) * up(x))."""
  cfg: object  # the model ConfigDict
  out_init_std: float

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    gate_BTF = Projection((c.d_model,), (c.d_ff,), ("embed", "mlp"), init_std=c.init_std,
                          name="gate", **kw)(x_BTD)
    up_BTF = Projection((c.d_model,), (c.d_ff,), ("embed", "mlp"), init_std=c.init_std,
                        name="up", **kw)(x_BTD)
    h_BTF = constrain(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
    return Projection((c.d_ff,), (c.d_model,), ("mlp", "embed"), init_std=self.out_init_std,
                      name="down", **kw)(h_BTF)


# config.model.mlp -> the feed-forward module class
MLPS: dict[str, type[nn.Module]] = {"dense": SwiGLU}
