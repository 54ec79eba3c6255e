"""Attention ops: XLA chunk functions, ring attention, and the dispatch onto the mesh."""

from llm.ops.attention.dispatch import (IMPLEMENTATIONS, attend, attend_cached,  # noqa: F401
                                        attend_paged)
