"""The Llama-family model: layers, attention, MLP kinds, the transformer; logical axes only."""

from llm.model.transformer import (Transformer, forward, init_params, make_model,  # noqa: F401
                                    require_lm_head, unbox)  # noqa: F401
