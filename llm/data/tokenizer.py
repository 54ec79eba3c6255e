"""Tokenizers behind one interface: sentencepiece models (trained here or shipped as
tokenizer.model) and Hugging Face `tokenizers` files (tokenizer.json, what Llama-3 and
Qwen ship). `open_tokenizer(path)` picks by the file.

Both have vocab_size, bos_id / eos_id (None when the tokenizer has none),
encode(text or texts) without adding BOS/EOS, decode(ids), and
encode_with_offsets(text) -> (ids, [(char start, char end)]) in which the special-token
strings of the text (e.g. "<|im_end|>", "<s>") become their ids as in transformers
(`add_special_tokens=False`): what chat templates need.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MODEL_TYPES = ("bpe", "unigram")  # data.tokenizer_model_type: sentencepiece algorithms


class Tokenizer:
  """A thin wrapper over SentencePieceProcessor with BOS/EOS ids."""

  def __init__(self, model_path: str | os.PathLike):
    path = Path(model_path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=str(path))

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def encode(self, text: str | list[str]):
    return self.sp.encode(text, num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_string(self, token_id: int | None) -> str | None:
    return None if token_id is None or token_id < 0 else self.sp.id_to_piece(token_id)

  def bos_prefix(self) -> list[int]:
    return [] if self.bos_id is None or self.bos_id < 0 else [self.bos_id]

  def token_byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each token stands for (byte-fallback pieces 1, control tokens 0)."""
    sp = self.sp
    out = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return out

  @property
  def special_tokens(self) -> dict[str, int]:
    """Strings that stand for one token: control symbols (<s>, </s>) and user-defined ones."""
    if not hasattr(self, "_special"):
      ids = {i for i in range(self.vocab_size) if self.sp.is_control(i)} | _user_defined_ids(self.sp)
      self._special = {self.sp.id_to_piece(i): i for i in sorted(ids)}
    return self._special

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = [], []
    control = {s: i for s, i in self.special_tokens.items() if self.sp.is_control(i)}
    for start, end, special in _split_special(text, control):
      if special is not None:
        ids.append(special)
        offsets.append((start, end))
        continue
      piece_text = text[start:end]
      char_of_byte = _char_index_of_bytes(piece_text)
      for p in self.sp.encode_as_proto(piece_text).pieces:
        ids.append(p.id)
        b, e = min(p.begin, len(char_of_byte) - 1), min(p.end, len(char_of_byte) - 1)
        first, last = char_of_byte[b], char_of_byte[e]
        if p.end > p.begin and last == first:  # a byte piece inside one character
          last = first + 1
        offsets.append((start + first, start + last))
    return ids, offsets


def _user_defined_ids(sp) -> set[int]:
  """Ids of the USER_DEFINED pieces, read from the model's protobuf wire format
  (ModelProto.pieces = 1, SentencePiece.type = 3, USER_DEFINED = 4) without the generated
  protobuf module, which ties the protobuf runtime to one major version."""
  from llm.data.sources import wire_fields
  pieces = [v for f, w, v in wire_fields(sp.serialized_model_proto()) if f == 1 and w == 2]
  return {i for i, piece in enumerate(pieces)
          if any(f == 3 and w == 0 and v == 4 for f, w, v in wire_fields(piece))}


def _char_index_of_bytes(text: str) -> list[int]:
  """For each UTF-8 byte offset of text (and its end), the index of its character."""
  out = []
  for ci, ch in enumerate(text):
    out += [ci] * len(ch.encode("utf-8"))
  return out + [len(text)]


def _split_special(text: str, specials: dict[str, int]):
  """(start, end, id or None) runs of `text`: special-token strings and the text between."""
  if not specials:
    yield 0, len(text), None
    return
  pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
  pos = 0
  for m in pattern.finditer(text):
    if m.start() > pos:
      yield pos, m.start(), None
    yield m.start(), m.end(), specials[m.group()]
    pos = m.end()
  if pos < len(text):
    yield pos, len(text), None


def _token_content(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json, with bos/eos and the chat template from
  the tokenizer_config.json (and chat_template.jinja) beside it, as transformers reads them."""

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as RustTokenizer
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    self.path = path
    self.tok = RustTokenizer.from_file(str(path))
    config_path = path.parent / "tokenizer_config.json"
    self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special_map = path.parent / "special_tokens_map.json"
    if special_map.is_file():
      for key, value in json.loads(special_map.read_text()).items():
        self.config.setdefault(key, value)
    jinja = path.parent / "chat_template.jinja"
    self.chat_template = (jinja.read_text() if jinja.is_file()
                          else self.config.get("chat_template") or None)
    if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t["name"]: t["template"] for t in self.chat_template}
      self.chat_template = named.get("default") or next(iter(named.values()))

  def _id(self, key: str) -> int | None:
    content = _token_content(self.config.get(key))
    return None if content is None else self.tok.token_to_id(content)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._id("bos_token")

  @property
  def eos_id(self) -> int | None:
    return self._id("eos_token")

  def token_string(self, token_id: int | None) -> str | None:
    return None if token_id is None else self.tok.id_to_token(token_id)

  def bos_prefix(self) -> list[int]:
    return [] if self.bos_id is None else [self.bos_id]

  def token_byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each token decodes to on its own (special tokens 0)."""
    special = set(self.special_tokens.values())
    return np.array([0 if i in special else len(self.tok.decode([i]).encode())
                     for i in range(self.vocab_size)], np.int64)

  @property
  def special_tokens(self) -> dict[str, int]:
    return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

  def encode(self, text: str | list[str]):
    if isinstance(text, str):
      return self.tok.encode(text, add_special_tokens=False).ids
    return [e.ids for e in self.tok.encode_batch(text, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = self.tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]


def open_tokenizer(path: str | os.PathLike):
  """A Hugging Face tokenizer for a .json file, else a sentencepiece model."""
  return HFTokenizer(path) if str(path).endswith(".json") else Tokenizer(path)


def train_tokenizer(docs: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    model_type: str = "bpe", max_chars: int = 20_000_000,
                    user_defined_symbols: tuple[str, ...] = ()) -> Tokenizer:
  """Trains a byte-fallback sentencepiece model on up to `max_chars` of `docs`.

  Rare characters (beyond 99.95% coverage) are spelled as UTF-8 bytes, never <unk>.

  Whitespace is kept verbatim (identity normalisation), so code round-trips.
  `user_defined_symbols` (e.g. a chat template's "<|im_start|>") are single tokens.
  """
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  lines, n_chars = [], 0
  for doc in docs:
    for line in doc.splitlines():
      if line.strip():
        lines.append(line[:4096])
        n_chars += len(line)
    if n_chars >= max_chars:
      break
  model = io.BytesIO()  # from an iterator into memory: no temporary path in the model
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=0.9995, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, num_threads=os.cpu_count() or 1,
        user_defined_symbols=list(user_defined_symbols), minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"sentencepiece could not train a vocabulary of {vocab_size} pieces on "
                     f"{n_chars:,} characters (model.vocab_size): {e}") from None
  tmp_out = out_path.with_suffix(f".{os.getpid()}.tmp")
  tmp_out.write_bytes(model.getvalue())
  os.replace(tmp_out, out_path)
  return Tokenizer(out_path)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
  """Sentencepiece vocabularies equal the model's; a tokenizer.json may be smaller (models
  pad their embedding, e.g. Qwen) but never larger."""
  if isinstance(tokenizer, HFTokenizer):
    if tokenizer.vocab_size > model_vocab_size:
      raise ValueError(f"tokenizer {str(tokenizer.path)!r} has {tokenizer.vocab_size} tokens "
                       f"but model.vocab_size={model_vocab_size}; it must not be larger")
    return
  if tokenizer.vocab_size != model_vocab_size:
    raise ValueError(f"tokenizer {str(tokenizer.path)!r} has vocab size {tokenizer.vocab_size} "
                     f"but model.vocab_size={model_vocab_size}; they must be equal")
