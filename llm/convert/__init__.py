"""Checkpoint interop: Hugging Face Llama/Mistral <-> llm (see llm/convert/hf.py)."""
