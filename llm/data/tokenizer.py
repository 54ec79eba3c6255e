"""Sentencepiece tokenizers: train one on a corpus, load one, check it fits the model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

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


def train_tokenizer(docs: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    model_type: str = "bpe", max_chars: int = 20_000_000) -> Tokenizer:
  """Trains a byte-fallback sentencepiece model on up to `max_chars` of `docs`.

  Rare characters (beyond 99.95% coverage) are spelled as UTF-8 bytes, never <unk>.

  Whitespace is kept verbatim (identity normalisation), so code round-trips.
  """
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = Path(tmp) / "corpus.txt"
    n_chars = 0
    with open(corpus, "w", encoding="utf-8") as fh:
      for doc in docs:
        for line in doc.splitlines():
          if line.strip():
            fh.write(line[:4096] + "\n")
            n_chars += len(line)
        if n_chars >= max_chars:
          break
    prefix = Path(tmp) / "sp"
    try:
      spm.SentencePieceTrainer.train(
          input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size,
          model_type=model_type, character_coverage=0.9995, byte_fallback=True,
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
          unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, num_threads=os.cpu_count() or 1,
          minloglevel=2)
    except RuntimeError as e:
      raise ValueError(f"sentencepiece could not train a vocabulary of {vocab_size} pieces on "
                       f"{n_chars:,} characters (model.vocab_size): {e}") from None
    tmp_out = out_path.with_suffix(".tmp")
    tmp_out.write_bytes(prefix.with_suffix(".model").read_bytes())
    os.replace(tmp_out, out_path)
  return Tokenizer(out_path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  if tokenizer.vocab_size != model_vocab_size:
    raise ValueError(f"tokenizer {str(tokenizer.path)!r} has vocab size {tokenizer.vocab_size} "
                     f"but model.vocab_size={model_vocab_size}; they must be equal")
