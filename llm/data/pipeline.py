"""From config to batches: corpus -> tokenizer -> token stream (cached) -> packed rows -> grain.

What a run reads is its objective's `Reader` (llm.objectives): `DOCUMENTS` here (text
from data.source, or with data.store token stores built by llm.data.prepare, read lazily
by llm.data.store, one store or a weighted mixture, with the store's tokenizer), or the
chat examples, preference pairs and prompts of llm.data.sft, llm.data.preference and
llm.data.prompts. A reader gives the texts a new tokenizer is trained on and turns the
data into train and validation rows (a `Corpus`).

The training iterator is a grain DatasetIterator, shuffled per epoch, sharded
per process (process p reads rows p, p + P, p + 2P, ...), whose state is
saved in every checkpoint so a resumed run reads exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Iterable

import grain
import numpy as np

from llm.config import comma_list
from llm.data import chat, sources, store
from llm.data.packing import PackedRows, concat_documents
from llm.data.tokenizer import Tokenizer, check_vocab, open_tokenizer, train_tokenizer
from llm.workdir import Workdir


@dataclasses.dataclass
class Corpus:
  tokenizer: Tokenizer
  train: object  # a grain random-access source of rows (PackedRows, PackedExamples, ...)
  val: object
  unigram_loss: float  # nats/token of val targets under the train unigram distribution


class Reader:
  """How a run's data become a Corpus: `texts` (what a new tokenizer is trained on; with
  `chat` the template's special strings join it as single tokens) and `read` (the train
  and validation rows). `reads` names the data for messages ("" for documents, which
  come from data.source or data.store; the others come from the JSONL files of
  data.paths)."""

  reads = ""
  chat = False

  def texts(self, config) -> Iterable[str]:
    raise NotImplementedError

  def read(self, config, workdir, tokenizer: Tokenizer) -> Corpus:
    raise NotImplementedError

  def prepare(self, config, workdir, tokenizer: Tokenizer | None = None) -> Corpus:
    """Train and validation rows, tokenized by `tokenizer` (default: the run's, trained
    if missing)."""
    return self.read(config, workdir, tokenizer or load_or_train_tokenizer(config, workdir, self))


class Documents(Reader):
  """Text documents packed into rows (llm.data.packing), the last data.val_fraction of the
  token stream held out; or the rows of token stores (data.store)."""

  def texts(self, config) -> Iterable[str]:
    return sources.documents(config.data)

  def read(self, config, workdir, tokenizer: Tokenizer) -> Corpus:
    if config.data.store:
      return prepare_store(config, tokenizer)
    tokens, doc_ids = token_stream(config, workdir, tokenizer)
    seq_len = config.data.seq_len
    split = int(len(tokens) * (1 - config.data.val_fraction))
    train = PackedRows(tokens[:split], doc_ids[:split], seq_len)
    val = PackedRows(tokens[split:], doc_ids[split:], seq_len)
    if len(train) == 0 or len(val) == 0:
      raise ValueError(f"the corpus has {len(tokens):,} tokens: too few for train and "
                       f"validation rows of data.seq_len={seq_len} at data.val_fraction="
                       f"{config.data.val_fraction}; use a larger corpus or a shorter seq_len")
    return Corpus(tokenizer, train, val,
                  unigram_loss(tokens[:split], val, config.model.vocab_size))


DOCUMENTS = Documents()


def _source_key(data_cfg) -> dict:
  """What the token stream depends on: the source settings and its files' identity."""
  return {**{k: data_cfg[k] for k in sources.SOURCE_KEYS},
          "files": sources.fingerprint(data_cfg)}


def _store_tokenizer(config, workdir) -> Tokenizer:
  """A store run's tokenizer: the store's, copied into the workdir (data.tokenizer_path,
  if set, must be the same model)."""
  first = store.TokenStore(comma_list(config.data.store)[0])
  path = Workdir(workdir).tokenizer(config)
  if config.data.tokenizer_path:
    if store.sha256_file(path) != first.tokenizer_sha256:
      raise ValueError(f"data.tokenizer_path={config.data.tokenizer_path!r} is not the "
                       f"tokenizer the store {first.path} was built with; leave it empty")
  elif not path.is_file() or store.sha256_file(path) != first.tokenizer_sha256:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(first.tokenizer_path, tmp)
    os.replace(tmp, path)
  tok = open_tokenizer(path)
  check_vocab(tok, config.model.vocab_size)
  return tok


def load_or_train_tokenizer(config, workdir: str | os.PathLike, reader: Reader) -> Tokenizer:
  """The run's tokenizer (llm.workdir), trained on `reader`'s texts into the workdir when
  missing and data.tokenizer_path is unset; a store's own with data.store."""
  if config.data.store:
    return _store_tokenizer(config, workdir)
  path = Workdir(workdir).tokenizer(config)
  if not path.is_file() and not config.data.tokenizer_path:
    print(f"training a {config.model.vocab_size}-piece sentencepiece tokenizer -> {path}",
          flush=True)
    symbols = chat.TEMPLATE_TOKENS.get(config.data.chat.template, ()) if reader.chat else ()
    tok = train_tokenizer(reader.texts(config), config.model.vocab_size, path,
                          config.data.tokenizer_model_type, config.data.tokenizer_max_chars,
                          symbols)
  else:
    tok = open_tokenizer(path)
  check_vocab(tok, config.model.vocab_size)
  return tok


def token_stream(config, workdir, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, doc_ids) of the whole corpus, cached in workdir/data/."""
  cache = Workdir(workdir).data
  meta = {"source": _source_key(config.data),
          "tokenizer_sha256": hashlib.sha256(tok.path.read_bytes()).hexdigest()}
  meta_path, stream_path = cache / "stream.json", cache / "stream.npz"
  if meta_path.is_file() and stream_path.is_file() and json.loads(meta_path.read_text()) == meta:
    with np.load(stream_path) as z:
      return z["tokens"], z["doc_ids"]
  docs = list(sources.documents(config.data))
  print(f"tokenizing {len(docs):,} documents", flush=True)
  tokens, doc_ids = concat_documents(tok.encode(docs), tok.bos_id, tok.eos_id)
  cache.mkdir(parents=True, exist_ok=True)
  tmp = cache / f"stream.{os.getpid()}.tmp.npz"
  np.savez(tmp, tokens=tokens, doc_ids=doc_ids)
  os.replace(tmp, stream_path)
  meta_path.write_text(json.dumps(meta))
  return tokens, doc_ids


def unigram_loss(train_tokens: np.ndarray, val: PackedRows, vocab_size: int) -> float:
  """Cross-entropy (nats) of val targets under add-one-smoothed train unigram frequencies."""
  counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  n = len(val) * val.seq_len
  targets, mask = val.tokens[1:n + 1], (val.doc_ids[1:n + 1] == val.doc_ids[:n])
  return float(-(logp[targets] * mask).sum() / max(mask.sum(), 1))


def prepare_store(config, tok) -> Corpus:
  """Train and validation rows read lazily from token stores (llm.data.store)."""
  stores, weights = store.open_stores(config.data.store, config.data.store_weights)
  for s in stores:
    if s.seq_len != config.data.seq_len:
      raise ValueError(f"the store {s.path} holds rows of seq_len={s.seq_len}, the config has "
                       f"data.seq_len={config.data.seq_len}: set data.seq_len={s.seq_len} or "
                       "rebuild the store")
    if s.vocab_size != config.model.vocab_size:
      raise ValueError(f"the store {s.path} was built for model.vocab_size={s.vocab_size}, "
                       f"the config has {config.model.vocab_size}")
  train = store.Mixture(stores, weights, "train")
  val = store.Mixture(stores, weights, "val")
  return Corpus(tok, train, val.sequence(), store.unigram_loss(stores, weights))


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"train.batch_size={global_batch} is not divisible by the "
                     f"{process_count} processes")
  return global_batch // process_count


def train_iterator(rows: PackedRows, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless, per-epoch-shuffled, per-process batches of packed rows (checkpointable);
  `rows` may be a store mixture (llm.data.store.Mixture), which shuffles its own parts."""
  if isinstance(rows, store.Mixture):
    ds = rows.dataset(seed)
  else:
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count].batch(_local_batch(global_batch, process_count),
                                              drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(rows: PackedRows, global_batch: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The same validation batches every time: rows in order, none repeated unless the
  split holds less than one batch."""
  n_batches = min(n_batches, max(1, len(rows) // global_batch))
  ds = grain.MapDataset.source(rows).repeat()
  ds = ds[process_index::process_count].batch(_local_batch(global_batch, process_count))
  return [ds[i] for i in range(n_batches)]
