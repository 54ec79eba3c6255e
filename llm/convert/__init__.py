"""Checkpoint interop: Hugging Face Llama/Mistral <-> llm (see llm/convert/hf.py).

From Python: `from llm.convert import hf_to_llm, llm_to_hf` (the functions behind
`python -m llm.convert hf-to-llm | llm-to-hf`)."""


def __getattr__(name: str):
  if name in ("hf_to_llm", "llm_to_hf"):  # loaded on use: they pull in the model and Orbax
    from llm.convert import __main__ as commands
    return getattr(commands, name)
  raise AttributeError(f"module 'llm.convert' has no attribute {name!r}")
