"""The token store: packed training rows in sharded ArrayRecord files, read lazily.

A store is a directory written by `python -m llm.data.prepare` (llm/data/prepare.py):

    index.json                      what it holds (STORE_FORMAT): seq_len, vocab size,
                                    tokenizer hash, source fingerprint, shard files with
                                    their row counts and sizes, per-stage curation counts,
                                    the config, and a checksum of all of that
    .llm_token_store                marks the directory as prepare's (MARKER)
    tokenizer.model                 the tokenizer the rows were made with
    unigram_counts.npy              [2, vocab] int64: counted targets of train / val rows
    train-SSSSS-of-NNNNN.array_record, val-SSSSS-of-NNNNN.array_record
    removed/removed-SSSSS-of-NNNNN.jsonl   with curation: each removed document's file,
                                    index in the file, stage and reason
    build.json                      how and when it was built (not part of its identity)

Each record is one row: int32 tokens[seq_len + 1] then int32 segments[seq_len + 1]
(the document number within the row from 1; 0 marks padding after a shard's last
document). Inputs, targets, segment ids, positions and the loss mask are derived on read
exactly as llm.data.packing.pack_row makes them from a token stream, so a row reads the
same from the store as from the in-memory path; padding is masked out.

Training reads stores through grain's ArrayRecord data source: random access, a global
shuffle per epoch and a per-process slice, so the iterator's state is an index and a
resumed run reads the same rows; a mixture of stores (`data.store_weights`) interleaves
each store's own shuffled stream in fixed proportions. Nothing is loaded whole: memory
does not grow with the store.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import grain
import numpy as np

from llm.data.packing import pack_row

STORE_FORMAT = 2
INDEX, TOKENIZER, UNIGRAM, BUILD = "index.json", "tokenizer.model", "unigram_counts.npy", "build.json"
MARKER = ".llm_token_store"  # marks a directory prepare made (and so may replace)
REMOVED = "removed"  # curation's audit trail: one JSONL per shard
SPLITS = ("train", "val")


def shard_name(split: str, shard: int, n_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{n_shards:05d}.array_record"


def encode_row(tokens: np.ndarray, segments: np.ndarray) -> bytes:
  return np.concatenate([tokens, segments]).astype("<i4").tobytes()


def decode_row(record: bytes, seq_len: int) -> dict:
  both = np.frombuffer(record, dtype="<i4")
  if both.size != 2 * (seq_len + 1):
    raise ValueError(f"a store record holds {both.size} int32s; rows of seq_len={seq_len} "
                     f"hold {2 * (seq_len + 1)}")
  tokens, segments = both[:seq_len + 1], both[seq_len + 1:]
  row = pack_row(tokens, segments, 0, seq_len)
  pad = segments[:-1] == 0
  row["segment_ids"] = np.where(pad, 0, row["segment_ids"]).astype(np.int32)
  row["loss_mask"] = row["loss_mask"] * (segments[1:] != 0) * ~pad
  return row


class RowPacker:
  """Documents in, rows out: BOS + tokens + EOS concatenated into one stream cut into
  rows of seq_len + 1 tokens that overlap by one (row i is stream[i*T : i*T + T + 1], as
  llm.data.packing.PackedRows reads it); `finish` pads the last partial row."""

  def __init__(self, seq_len: int, bos_id: int, eos_id: int, pad_id: int = 0):
    self.seq_len, self.bos_id, self.eos_id, self.pad_id = seq_len, bos_id, eos_id, pad_id
    self._tokens: list[np.ndarray] = []
    self._docs: list[np.ndarray] = []
    self._held = 0
    self._doc = 0

  def add(self, ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adds one document; returns the rows it completes as (tokens, segments)."""
    self._doc += 1
    doc = np.concatenate([[self.bos_id], np.asarray(ids, np.int32), [self.eos_id]]).astype(np.int32)
    self._tokens.append(doc)
    self._docs.append(np.full(len(doc), self._doc, np.int64))
    self._held += len(doc)
    return self._drain(final=False)

  def finish(self) -> list[tuple[np.ndarray, np.ndarray]]:
    return self._drain(final=True)

  def _drain(self, final: bool):
    T = self.seq_len
    if self._held < T + 1 and not (final and self._held >= 2):
      return []
    tokens, docs = np.concatenate(self._tokens), np.concatenate(self._docs)
    rows, start = [], 0
    while len(tokens) - start >= T + 1:
      rows.append(self._row(tokens[start:start + T + 1], docs[start:start + T + 1]))
      start += T
    rest_t, rest_d = tokens[start:], docs[start:]
    if final and len(rest_t) >= 2:
      n = T + 1 - len(rest_t)
      rows.append(self._row(np.concatenate([rest_t, np.full(n, self.pad_id, np.int32)]),
                            np.concatenate([rest_d, np.full(n, -1, np.int64)])))
      rest_t, rest_d = rest_t[:0], rest_d[:0]
    self._tokens, self._docs, self._held = [rest_t], [rest_d], len(rest_t)
    return rows

  @staticmethod
  def _row(tokens, docs):
    new = np.concatenate([[True], docs[1:] != docs[:-1]])
    segments = np.cumsum(new).astype(np.int32)
    return tokens.astype(np.int32), np.where(docs < 0, 0, segments).astype(np.int32)


def row_target_counts(row: dict, vocab_size: int) -> np.ndarray:
  return np.bincount(row["targets"][row["loss_mask"] > 0], minlength=vocab_size)


def sha256_file(path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def index_checksum(index: dict) -> str:
  """sha256 of the index's content without its "checksum" entry (canonical JSON)."""
  body = {k: v for k, v in index.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def is_store_dir(path: Path) -> bool:
  """Whether `path` is a directory prepare made: its marker, or (stores built before the
  marker existed) an index.json that reads as a store's index."""
  if (path / MARKER).is_file():
    return True
  try:
    index = json.loads((path / INDEX).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(index, dict) and {"format", "shards", "tokenizer_sha256"} <= set(index)


class TokenStore:
  """A store directory's index and its splits as random-access row sources. Opening one
  verifies it: the index against its own checksum, each shard file's size, and the
  tokenizer's sha256; anything amiss is one error naming the file and the way out."""

  def __init__(self, path):
    self.path = Path(path)
    index_path = self.path / INDEX
    rebuild = f"rebuild it with `python -m llm.data.prepare --output={path}`"
    if not index_path.is_file():
      raise FileNotFoundError(f"data.store={str(path)!r} is not a token store (no {INDEX}); "
                              "build one with `python -m llm.data.prepare --config=CONFIG "
                              f"--output={path}`")
    try:
      self.index = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{index_path} is not valid JSON (truncated or damaged: {e}); "
                       f"{rebuild}") from None
    if not isinstance(self.index, dict):
      raise ValueError(f"{index_path} holds no store index; {rebuild}")
    if self.index.get("format") != STORE_FORMAT:
      raise ValueError(f"{index_path} has store format {self.index.get('format')!r}; this "
                       f"version reads format {STORE_FORMAT}: {rebuild}")
    if self.index.get("checksum") != index_checksum(self.index):
      raise ValueError(f"{index_path} does not match its checksum: it was edited or damaged "
                       f"after prepare wrote it; {rebuild}")
    self.seq_len = int(self.index["seq_len"])
    self.vocab_size = int(self.index["vocab_size"])
    expected = [(self.path / s["file"], s["bytes"]) for split in SPLITS
                for s in self.index["shards"][split]]
    expected.append((self.path / UNIGRAM, self.index["unigram_bytes"]))
    for file, size in expected:
      if not file.is_file():
        raise ValueError(f"{file} is missing from the token store; {rebuild}")
      if file.stat().st_size != size:
        raise ValueError(f"{file} has {file.stat().st_size:,} bytes, the store's index says "
                         f"{size:,} (truncated or replaced); {rebuild}")
    if not self.tokenizer_path.is_file():
      raise ValueError(f"{self.tokenizer_path} is missing from the token store; {rebuild}")
    if sha256_file(self.tokenizer_path) != self.tokenizer_sha256:
      raise ValueError(f"{self.tokenizer_path} is not the tokenizer the store's rows were made "
                       f"with (its sha256 differs from the index's); restore it or {rebuild}")

  @property
  def tokenizer_path(self) -> Path:
    return self.path / TOKENIZER

  @property
  def tokenizer_sha256(self) -> str:
    return self.index["tokenizer_sha256"]

  def rows(self, split: str) -> "StoreRows":
    return StoreRows(self, split)

  def unigram_counts(self) -> np.ndarray:
    return np.load(self.path / UNIGRAM)


class StoreRows:
  """One split of a store as a grain random-access source of row dicts."""

  def __init__(self, store: TokenStore, split: str):
    self.store, self.split, self.seq_len = store, split, store.seq_len
    self.files = [str(store.path / s["file"]) for s in store.index["shards"][split]]
    self._len = sum(int(s["rows"]) for s in store.index["shards"][split])
    self._source = None

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"row {index} out of range [0, {self._len})")
    if self._source is None:  # opened on first read; files are read by random access
      self._source = grain.sources.ArrayRecordDataSource(self.files)
    return decode_row(self._source[index], self.seq_len)

  def __repr__(self) -> str:
    return f"StoreRows({str(self.store.path)!r}, {self.split!r}, rows={self._len})"


class _Indexable:
  """A finite grain MapDataset as a plain random-access sequence."""

  def __init__(self, ds: grain.MapDataset):
    self._ds = ds

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int):
    if not 0 <= int(index) < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    return self._ds[int(index)]


class Mixture:
  """Several stores with weights: training rows interleave each store's endless,
  per-epoch-shuffled stream in the weights' proportions (grain MapDataset.mix), so the
  mixture is deterministic and its position is one index."""

  def __init__(self, stores: list[TokenStore], weights: list[float], split: str):
    self.stores, self.weights, self.split = stores, weights, split
    self.parts = [s.rows(split) for s in stores]
    self.seq_len = stores[0].seq_len

  def dataset(self, seed: int) -> grain.MapDataset:
    """Endless shuffled training rows."""
    parts = [grain.MapDataset.source(p).shuffle(seed=seed + i).repeat()
             for i, p in enumerate(self.parts)]
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self.weights)

  def sequence(self):
    """The rows in a fixed order, once (evaluation): one store's rows as they are, several
    interleaved in proportion until one runs out."""
    if len(self.parts) == 1:
      return self.parts[0]
    return _Indexable(grain.MapDataset.mix([grain.MapDataset.source(p) for p in self.parts],
                                           self.weights))

  def __len__(self) -> int:
    return sum(len(p) for p in self.parts)


def parse_weights(stores: list[str], weights: str) -> list[float]:
  if not weights.strip():
    return [1.0 / len(stores)] * len(stores)
  values = []
  for w in weights.split(","):
    try:
      values.append(float(w))
    except ValueError:
      raise ValueError(f"data.store_weights={weights!r}: {w.strip()!r} is not a number") from None
  if len(values) != len(stores):
    raise ValueError(f"data.store_weights={weights!r} gives {len(values)} weights for "
                     f"{len(stores)} stores in data.store")
  if any(not math.isfinite(v) or v <= 0 for v in values):
    raise ValueError(f"data.store_weights={weights!r}: every weight must be > 0")
  total = sum(values)
  return [v / total for v in values]


def open_stores(store: str, weights: str) -> tuple[list[TokenStore], list[float]]:
  """The stores of `data.store` (comma-separated) and their normalised weights; they must
  share one tokenizer and one seq_len."""
  paths = [p.strip() for p in store.split(",") if p.strip()]
  stores = [TokenStore(p) for p in paths]
  w = parse_weights(paths, weights)
  for s in stores[1:]:
    if s.tokenizer_sha256 != stores[0].tokenizer_sha256:
      raise ValueError(f"data.store mixes stores made with different tokenizers: {s.path} and "
                       f"{stores[0].path}; build them with one data.tokenizer_path")
    if s.seq_len != stores[0].seq_len:
      raise ValueError(f"data.store mixes seq_len {s.seq_len} ({s.path}) and "
                       f"{stores[0].seq_len} ({stores[0].path})")
  return stores, w


def unigram_loss(stores: list[TokenStore], weights: list[float]) -> float:
  """Cross-entropy (nats) of validation targets under the add-one-smoothed unigram
  distribution of training targets, each mixed by the store weights."""
  p = val = 0.0
  for s, w in zip(stores, weights):
    counts = s.unigram_counts().astype(np.float64)
    train = counts[0] + 1.0
    p = p + w * train / train.sum()
    val = val + w * counts[1] / max(counts[1].sum(), 1.0)
  return float(-(val * np.log(p)).sum())
