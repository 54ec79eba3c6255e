import json

import numpy as np
import pytest

from llm.data import packing, pipeline, sources, tokenizer
from tests.helpers import tiny_config


# ----------------------------------------------------------------------------- packing

def _reference_row(docs, start, seq_len, bos=1, eos=2):
  """Slow, obvious construction of one packed row from the per-document lists."""
  stream = []  # (token, doc index)
  for d, ids in enumerate(docs):
    stream += [(bos, d)] + [(t, d) for t in ids] + [(eos, d)]
  window = stream[start:start + seq_len + 1]
  inputs = [t for t, _ in window[:-1]]
  targets = [t for t, _ in window[1:]]
  seg, pos, mask = [], [], []
  for i in range(seq_len):
    new = i == 0 or window[i][1] != window[i - 1][1]
    seg.append((seg[-1] + 1 if new else seg[-1]) if seg else 1)
    pos.append(0 if new else pos[-1] + 1)
    mask.append(float(window[i][1] == window[i + 1][1]))
  return inputs, targets, seg, pos, mask


def test_packing_matches_reference():
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 100, n)) for n in (5, 1, 17, 0, 9, 30, 2)]
  tokens, doc_ids = packing.concat_documents(docs, 1, 2)
  rows = packing.PackedRows(tokens, doc_ids, seq_len=8)
  assert len(rows) == (len(tokens) - 1) // 8
  for i in range(len(rows)):
    got = rows[i]
    want = _reference_row(docs, i * 8, 8)
    for key, ref in zip(("inputs", "targets", "segment_ids", "positions", "loss_mask"), want):
      np.testing.assert_array_equal(got[key], ref, err_msg=f"row {i} {key}")
  with pytest.raises(IndexError):
    rows[len(rows)]


# ----------------------------------------------------------------------------- sources

def test_text_jsonl_and_separator_sources(tmp_path):
  (tmp_path / "a.txt").write_text("one\n\n\ntwo")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}))
  cfg = tiny_config().data
  cfg.update(source="text", paths=str(tmp_path / "*.txt"), doc_separator="")
  assert list(sources.documents(cfg)) == ["one\n\n\ntwo"]
  cfg.doc_separator = r"\n\n+"
  assert list(sources.documents(cfg)) == ["one", "two"]
  cfg.update(source="jsonl", paths=str(tmp_path / "b.jsonl"))
  assert list(sources.documents(cfg)) == ["x", "y"]
  cfg.jsonl_key = "body"
  with pytest.raises(KeyError, match="no key 'body'"):
    list(sources.documents(cfg))


def test_missing_and_empty_corpus_are_errors(tmp_path):
  cfg = tiny_config().data
  cfg.update(source="text", paths=str(tmp_path / "nothing*.txt"))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    list(sources.documents(cfg))
  (tmp_path / "empty.txt").write_text("  \n")
  cfg.paths = str(tmp_path / "empty.txt")
  with pytest.raises(ValueError, match="corpus is empty"):
    list(sources.documents(cfg))


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  from array_record.python import array_record_module
  out = tmp_path / "tiny_ds" / "1.0.0"
  out.mkdir(parents=True)
  writer = array_record_module.ArrayRecordWriter(
      str(out / "tiny_ds-train.array_record-00000-of-00001"), "group_size:1")
  texts = ["first document", "zweites Dokument", "third üñí"]
  for t in texts:
    writer.write(sources.encode_example({"text": [t.encode()], "label": [b"x"]}))
  writer.close()
  cfg = tiny_config().data
  cfg.update(source="tfds", tfds_name="tiny_ds", tfds_dir=str(tmp_path))
  assert list(sources.documents(cfg)) == texts
  cfg.tfds_key = "missing"
  with pytest.raises(KeyError, match="no bytes feature 'missing'"):
    list(sources.documents(cfg))


def test_stdlib_source_lists_python_files():
  files = sources.stdlib_files()
  assert len(files) > 100 and all(f.suffix == ".py" for f in files)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_code_and_checks_vocab(tokenizer_path):
  tok = tokenizer.Tokenizer(tokenizer_path)
  text = "def f(x):\n    return x  # 12\t€"
  assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 512
  with pytest.raises(ValueError, match="vocab size 512 but model.vocab_size=1024"):
    tokenizer.check_vocab(tok, 1024)


# ----------------------------------------------------------------------------- pipeline

def test_prepare_splits_and_baseline(config, tmp_path):
  c = pipeline.DOCUMENTS.prepare(config, tmp_path)
  assert len(c.train) > 10 * len(c.val) / 2 and len(c.val) > 0
  assert 3.0 < c.unigram_loss < np.log(config.model.vocab_size)
  # The cache is reused: same arrays on a second call.
  again = pipeline.DOCUMENTS.prepare(config, tmp_path)
  np.testing.assert_array_equal(again.train.tokens, c.train.tokens)


def test_corpus_too_small_for_seq_len(config, tmp_path):
  config.data.seq_len = 10 ** 6
  with pytest.raises(ValueError, match="too few for train and validation rows"):
    pipeline.DOCUMENTS.prepare(config, tmp_path)


def test_iterator_state_restores_exactly(config, tmp_path):
  rows = pipeline.DOCUMENTS.prepare(config, tmp_path).train
  it = pipeline.train_iterator(rows, 4, seed=3)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(3)]
  fresh = pipeline.train_iterator(rows, 4, seed=3)
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], want)


def test_processes_read_disjoint_shares_of_the_same_rows(config, tmp_path):
  rows = pipeline.DOCUMENTS.prepare(config, tmp_path).train
  whole = next(pipeline.train_iterator(rows, 8, seed=1))["inputs"]
  parts = [next(pipeline.train_iterator(rows, 8, seed=1, process_index=p, process_count=2))["inputs"]
           for p in range(2)]
  assert parts[0].shape == (4, rows.seq_len)
  as_set = lambda a: sorted(map(tuple, a.tolist()))
  assert as_set(np.concatenate(parts)) == as_set(whole)


def test_epochs_are_reshuffled(config, tmp_path):
  rows = pipeline.DOCUMENTS.prepare(config, tmp_path).train
  n = len(rows)
  it = pipeline.train_iterator(rows, 1, seed=0)
  first = [next(it)["inputs"][0].tobytes() for _ in range(n)]
  second = [next(it)["inputs"][0].tobytes() for _ in range(n)]
  assert sorted(first) == sorted(second) and first != second
