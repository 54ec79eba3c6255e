"""From config to batches: corpus -> tokenizer -> token stream (cached) -> packed rows -> grain.

With data.store the rows come from token stores built by llm.data.prepare instead, read
lazily (llm.data.store), one store or a weighted mixture; the tokenizer is the store's.

With train.objective="sft" the corpus is JSONL chat examples (llm.data.sft): rendered
with the chat template, masked to the assistant's tokens, packed per example; with
"dpo" or "reward" it is preference pairs (llm.data.preference), both sides of a pair in
one row; with "grpo" it is prompts (llm.data.prompts), which the run completes itself
(llm.training.grpo) and the iterator yields prompt indices.

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

import grain
import numpy as np

from llm.config import comma_list
from llm.data import chat, preference, prompts, sft, sources, store
from llm.data.packing import PackedRows, concat_documents
from llm.data.tokenizer import Tokenizer, check_vocab, open_tokenizer, train_tokenizer
from llm.workdir import Workdir


@dataclasses.dataclass
class Corpus:
  tokenizer: Tokenizer
  train: PackedRows | sft.PackedExamples
  val: PackedRows | sft.PackedExamples
  unigram_loss: float  # nats/token of val targets under the train unigram distribution


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


def load_or_train_tokenizer(config, workdir: str | os.PathLike) -> Tokenizer:
  """The run's tokenizer (llm.workdir), trained on the corpus into the workdir when
  missing and data.tokenizer_path is unset; a store's own with data.store."""
  if config.data.store:
    return _store_tokenizer(config, workdir)
  path = Workdir(workdir).tokenizer(config)
  if not path.is_file() and not config.data.tokenizer_path:
    print(f"training a {config.model.vocab_size}-piece sentencepiece tokenizer -> {path}",
          flush=True)
    if is_chat(config):  # message texts; the template's special strings as single tokens
      objective = config.train.objective
      convs = (sft.conversations(config.data) if objective == "sft" else
               [p.messages for p in prompts.read_prompts(config.data)] if objective == "grpo"
               else [c for pair in preference.pairs(config.data) for c in pair])
      docs = (m["content"] for conv in convs for m in conv)
      symbols = chat.TEMPLATE_TOKENS.get(config.data.chat.template, ())
    else:
      docs, symbols = sources.documents(config.data), ()
    tok = train_tokenizer(docs, config.model.vocab_size, path, config.data.tokenizer_model_type,
                          config.data.tokenizer_max_chars, symbols)
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


def is_chat(config) -> bool:
  """Whether the run's data are chat examples or preference pairs (the objective reads
  them) rather than documents."""
  return config.train.objective in ("sft", "dpo", "reward", "grpo")


def prepare_chat(config, tok) -> Corpus:
  """SFT rows: chat examples split into train and validation, each packed."""
  d = config.data
  convs = sft.conversations(d)
  cut = sft.split(len(convs), d)
  train_t = sft.tokenize_examples(convs[:cut], tok, d)
  val_t = sft.tokenize_examples(convs[cut:], tok, d)
  print(f"chat examples: {len(train_t.ids):,} train, {len(val_t.ids):,} validation; "
        f"truncated {train_t.truncated + val_t.truncated:,}, dropped "
        f"{train_t.dropped + val_t.dropped:,} (over data.seq_len={d.seq_len} + 1 tokens, "
        f"data.chat.overlong={d.chat.overlong!r}, or nothing left to learn)", flush=True)
  if not train_t.ids or not val_t.ids:
    raise ValueError("no chat example is left in the train or the validation split "
                     "(see the counts above)")
  train = sft.pack(train_t.ids, train_t.masks, d.seq_len)
  val = sft.pack(val_t.ids, val_t.masks, d.seq_len)
  return Corpus(tok, sft.PackedExamples(train), sft.PackedExamples(val),
                sft.masked_unigram_loss(train, val, config.model.vocab_size))


def prepare(config, workdir, tokenizer: Tokenizer | None = None) -> Corpus:
  """Train and validation rows of the corpus, tokenized by `tokenizer` (default: the run's,
  trained if missing)."""
  tok = tokenizer or load_or_train_tokenizer(config, workdir)
  if config.train.objective in ("dpo", "reward"):
    train, val = preference.prepare_pairs(config, tok,
                                           score_last=config.train.objective == "reward")
    return Corpus(tok, train, val, float("nan"))
  if config.train.objective == "grpo":
    train, val = prompts.prepare_prompts(config, tok)
    return Corpus(tok, train, val, float("nan"))
  if is_chat(config):
    return prepare_chat(config, tok)
  if config.data.store:
    return prepare_store(config, tok)
  tokens, doc_ids = token_stream(config, workdir, tok)
  seq_len = config.data.seq_len
  split = int(len(tokens) * (1 - config.data.val_fraction))
  train = PackedRows(tokens[:split], doc_ids[:split], seq_len)
  val = PackedRows(tokens[split:], doc_ids[split:], seq_len)
  if len(train) == 0 or len(val) == 0:
    raise ValueError(f"the corpus has {len(tokens):,} tokens: too few for train and validation "
                     f"rows of data.seq_len={seq_len} at data.val_fraction="
                     f"{config.data.val_fraction}; use a larger corpus or a shorter seq_len")
  return Corpus(tok, train, val, unigram_loss(tokens[:split], val, config.model.vocab_size))


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
