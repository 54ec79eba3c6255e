"""Inference: KV-cache decoding, samplers, and the text API."""

from llm.inference.decoder import Decoder  # noqa: F401
from llm.inference.sampling import SamplingParams  # noqa: F401
from llm.inference.text import chat, generate, load  # noqa: F401
