"""Feed-forward layers, one per `config.model.mlp` kind.

Every kind is a flax module built as `MLPS[kind](cfg, out_init_std=..., name="mlp")`
mapping [B, T, D] -> [B, T, D]; it may hand auxiliary losses to the objective with
`layers.add_aux_loss`. Adding a kind is a class plus one line in `MLPS`.
"""

from __future__ import annotations

import flax.linen as nn

from llm.model.layers import SwiGLU
from llm.model.moe import MoE

# config.model.mlp -> the feed-forward module class
MLPS: dict[str, type[nn.Module]] = {"dense": SwiGLU, "moe": MoE}
