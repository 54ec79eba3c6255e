from llm.model.transformer import Transformer, make_model  # noqa: F401
