"""Structured outputs: a JSON schema (or "any JSON object") turned into a token mask per
step, with llguidance (a grammar engine made for this; no torch needed).

`Grammars(tokenizer, vocab_size)` wraps the engine's tokenizer once (a Hugging Face
tokenizer.json is handed over whole; a sentencepiece model as its pieces' bytes).
`grammars.check(spec)` validates a grammar before a request is queued (a bad schema is a
400, not a failed stream); `grammars.matcher(spec)` makes the per-sequence state that
says which tokens may come next (`allowed`), follows the sampled ones (`accept`) and
tells when the output is complete (`done`). A spec is a JSON string:
{"json_schema": {...}} or {"json_object": true}.
"""

from __future__ import annotations

import functools
import json

import numpy as np


def json_schema_spec(schema: dict) -> str:
  return json.dumps({"json_schema": schema}, sort_keys=True)


JSON_OBJECT_SPEC = json.dumps({"json_object": True})


def _sentencepiece_bytes(tokenizer) -> list[bytes]:
  sp = tokenizer.sp
  out = []
  for i in range(sp.get_piece_size()):
    piece = sp.id_to_piece(i)
    if sp.is_control(i) or sp.is_unknown(i):
      out.append(b"")
    elif sp.is_byte(i):  # <0xAB>
      out.append(bytes([int(piece[3:-1], 16)]))
    else:
      out.append(piece.replace("\u2581", " ").encode())
  return out


class _SentencepieceForGuidance:
  """What llguidance's TokenizerWrapper reads from a tokenizer."""

  def __init__(self, tokenizer, vocab_size: int):
    self.tokens = _sentencepiece_bytes(tokenizer)
    self.tokens += [b""] * (vocab_size - len(self.tokens))
    self.eos_token_id = tokenizer.eos_id
    self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
    self.special_token_ids = [i for i in range(tokenizer.vocab_size)
                              if tokenizer.sp.is_control(i)]
    self._tokenizer = tokenizer

  def __call__(self, text):
    return list(self._tokenizer.encode(text.decode() if isinstance(text, bytes) else text))


class Matcher:
  """One sequence's grammar state."""

  def __init__(self, matcher, vocab_size: int):
    self._m, self.vocab_size = matcher, vocab_size

  def allowed(self) -> np.ndarray:
    """bool [vocab_size]: the tokens the grammar allows next."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
    bits = allocate_token_bitmask(1, self.vocab_size)
    fill_next_token_bitmask(self._m, bits, 0)
    unpacked = np.unpackbits(bits.view(np.uint8), bitorder="little")
    return unpacked[:self.vocab_size].astype(bool)

  def accept(self, token: int) -> None:
    self._m.consume_token(int(token))

  @property
  def done(self) -> bool:
    return self._m.is_stopped()


class Grammars:
  """The engine's grammar compiler (see the module docstring)."""

  def __init__(self, tokenizer, vocab_size: int):
    import llguidance
    from llguidance import LLTokenizer, TokenizerWrapper
    self._llg = llguidance
    self.vocab_size = vocab_size
    if hasattr(tokenizer, "tok"):  # a Hugging Face tokenizer.json
      self._tokenizer = LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size,
                                    eos_token=tokenizer.eos_id)
    else:
      self._tokenizer = LLTokenizer(TokenizerWrapper(
          _SentencepieceForGuidance(tokenizer, vocab_size)), n_vocab=vocab_size)
    # a request is checked before it is queued and again as it is added, and each of its
    # n samples gets a matcher: each spec is compiled and validated once (failures are not
    # cached: they raise)
    self._grammar = functools.lru_cache(maxsize=1024)(self._compile)

  def _compile(self, spec: str) -> str:
    """The validated llguidance grammar of a spec; ValueError naming what is wrong."""
    schema = json.loads(spec).get("json_schema") or {"type": "object"}
    try:
      grammar = self._llg.LLMatcher.grammar_from_json_schema(
          schema, defaults={"whitespace_flexible": False})
    except Exception as e:  # noqa: BLE001 - llguidance raises its own types
      raise ValueError(f"the JSON schema cannot be used: {e}") from None
    message = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
    if message:
      raise ValueError(f"the JSON schema cannot be used: {message}")
    return grammar

  def check(self, spec: str) -> None:
    """ValueError naming what is wrong with the grammar."""
    self._grammar(spec)

  def matcher(self, spec: str) -> Matcher:
    m = self._llg.LLMatcher(self._tokenizer, self._grammar(spec))
    if m.is_error():
      raise ValueError(f"the JSON schema cannot be used: {m.get_error()}")
    return Matcher(m, self.vocab_size)
