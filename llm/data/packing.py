"""Packing into fixed-length rows with segment ids and positions: a token stream of
documents (PackedRows), or examples (chat examples, preference pairs) placed whole in
rows (assign_rows, PackedExamples); the train / validation split of examples.

Documents (BOS + tokens + EOS) are concatenated into one stream; row i holds
stream[i*T : i*T + T + 1], read as inputs [:-1] and targets [1:]. Segment ids
number the documents within a row from 1, positions restart at each document,
and the loss mask drops the one target per boundary that belongs to the next
document. Attention masked by segment never crosses documents.
"""

from __future__ import annotations

import numpy as np


def concat_documents(token_lists, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, doc_ids) streams of int32 from per-document token lists."""
  lengths = np.array([len(t) + 2 for t in token_lists], dtype=np.int64)
  tokens = np.empty(int(lengths.sum()), dtype=np.int32)
  pos = 0
  for ids in token_lists:
    tokens[pos] = bos_id
    tokens[pos + 1:pos + 1 + len(ids)] = ids
    tokens[pos + 1 + len(ids)] = eos_id
    pos += len(ids) + 2
  doc_ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
  return tokens, doc_ids


def pack_row(tokens: np.ndarray, doc_ids: np.ndarray, start: int, seq_len: int) -> dict:
  """One training row from stream[start : start + seq_len + 1]."""
  window = tokens[start:start + seq_len + 1]
  docs = doc_ids[start:start + seq_len + 1]
  if len(window) != seq_len + 1:
    raise IndexError(f"row at {start} needs {seq_len + 1} tokens, stream has {len(window)}")
  in_docs = docs[:-1]
  new_doc = np.concatenate([[True], in_docs[1:] != in_docs[:-1]])
  segment_ids = np.cumsum(new_doc).astype(np.int32)
  starts = np.maximum.accumulate(np.where(new_doc, np.arange(seq_len), 0))
  return {
      "inputs": window[:-1].astype(np.int32),
      "targets": window[1:].astype(np.int32),
      "segment_ids": segment_ids,
      "positions": (np.arange(seq_len) - starts).astype(np.int32),
      "loss_mask": (docs[1:] == in_docs).astype(np.float32),
  }


class PackedRows:
  """A grain random-access source of packed rows over a token stream."""

  def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray, seq_len: int):
    self.tokens, self.doc_ids, self.seq_len = tokens, doc_ids, seq_len

  def __len__(self) -> int:
    return max(0, (len(self.tokens) - 1) // self.seq_len)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    return pack_row(self.tokens, self.doc_ids, index * self.seq_len, self.seq_len)

  def __repr__(self) -> str:
    return f"PackedRows(n_tokens={len(self.tokens)}, seq_len={self.seq_len}, rows={len(self)})"


def assign_rows(lengths, seq_len: int) -> list[list[int]]:
  """Item indices per row: items in order, a new row whenever the next (of `lengths`
  positions) does not fit what is left of the current one."""
  rows: list[list[int]] = []
  used = seq_len
  for i, n in enumerate(lengths):
    if used + n > seq_len:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += n
  return rows


def empty_rows(n_rows: int, seq_len: int, int_fields=()) -> dict[str, np.ndarray]:
  """Zeroed rows of inputs/targets/segment_ids/positions (int32), loss_mask (float32) and
  `int_fields` (int32)."""
  out = {k: np.zeros((n_rows, seq_len), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions", *int_fields)}
  out["loss_mask"] = np.zeros((n_rows, seq_len), np.float32)
  return out


def place(rows: dict, row: int, pos: int, segment: int, ids: np.ndarray,
          mask: np.ndarray) -> slice:
  """Writes one sequence at `pos` of `row` as its own segment: inputs ids[:-1], targets
  ids[1:], positions from 0, loss mask mask[1:]; returns the span it fills."""
  n = len(ids) - 1
  span = slice(pos, pos + n)
  rows["inputs"][row, span] = ids[:-1]
  rows["targets"][row, span] = ids[1:]
  rows["segment_ids"][row, span] = segment
  rows["positions"][row, span] = np.arange(n)
  rows["loss_mask"][row, span] = mask[1:]
  return span


class PackedExamples:
  """A grain random-access source over packed example rows."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self.rows = rows
    self.seq_len = rows["inputs"].shape[1]

  def __len__(self) -> int:
    return len(self.rows["inputs"])

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    return {k: v[index] for k, v in self.rows.items()}

  def __repr__(self) -> str:
    return f"PackedExamples(rows={len(self)}, seq_len={self.seq_len})"


def split(n_examples: int, data_cfg, what: str = "example(s)") -> int:
  """Index of the first validation example: at least one of each, so at least two."""
  if n_examples < 2:
    raise ValueError(f"data.paths={data_cfg.paths!r} holds {n_examples} {what}: too few for "
                     "a train and a validation split")
  n_val = min(max(1, round(n_examples * data_cfg.val_fraction)), n_examples - 1)
  return n_examples - n_val
