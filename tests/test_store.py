"""The token store (llm.data.store) built by the Beam pipeline (llm.data.prepare): rows equal
the in-memory packing of the same documents, the store is the same with 1 or 2 workers, a
re-run is a no-op, training from it resumes bitwise, and mixtures keep their proportions."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm.config import validate
from llm.data import packing, pipeline, prepare, sources, store
from llm.data.tokenizer import open_tokenizer
from llm.train import train
from tests.helpers import ROOT, losses, tiny_config

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _config(tokenizer_path, **data):
  c = tiny_config()
  c.data.update(tokenizer_path=tokenizer_path, store_shards=3, **data)
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_path):
  """A store of the tiny corpus, built in one process."""
  out = tmp_path_factory.mktemp("store") / "tiny"
  c = _config(tokenizer_path)
  prepare.prepare_store(c, out, IN_PROCESS)
  return c, out


def test_packer_rows_equal_packed_rows():
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 100, size=rng.integers(0, 40)).tolist() for _ in range(50)]
  tokens, doc_ids = packing.concat_documents(docs, 1, 2)
  ref = packing.PackedRows(tokens, doc_ids, 16)
  packer = store.RowPacker(16, 1, 2)
  rows = [r for d in docs for r in packer.add(d)] + packer.finish()
  assert len(rows) == len(ref) + 1  # the last, partial row is padded
  for i in range(len(ref)):
    got = store.decode_row(store.encode_row(*rows[i]), 16)
    for k, v in ref[i].items():
      np.testing.assert_array_equal(got[k], v, err_msg=f"row {i} {k}")
  last = store.decode_row(store.encode_row(*rows[-1]), 16)
  n_real = len(tokens) - len(ref) * 16  # tokens left for the padded row
  assert last["loss_mask"][:n_real - 1].all() and not last["loss_mask"][n_real - 1:].any()
  assert (last["segment_ids"][n_real:] == 0).all()


def test_store_rows_are_the_documents_packed(built, tokenizer_path):
  c, out = built
  s = store.TokenStore(out)
  tok = open_tokenizer(tokenizer_path)
  src = sources.source(c.data)
  groups = prepare.plan_shards([f.stat().st_size for f in src.files], 3)
  assert len(s.index["shards"]["train"]) == len(groups) == 3
  for split in store.SPLITS:
    offset = 0
    for shard, files in enumerate(groups):
      docs = [t for fi in files for di, t in enumerate(src.read(src.files[fi]))
              if t.strip() and prepare.is_val((fi, di), c.data.val_fraction, 0) == (split == "val")]
      tokens, doc_ids = packing.concat_documents(tok.encode(docs), tok.bos_id, tok.eos_id)
      ref = packing.PackedRows(tokens, doc_ids, c.data.seq_len)
      rows = s.rows(split)
      for i in range(len(ref)):
        got = rows[offset + i]
        for k, v in ref[i].items():
          np.testing.assert_array_equal(got[k], v, err_msg=f"{split} shard {shard} row {i} {k}")
      offset += len(ref) + 1  # + the shard's padded last row
    assert offset == len(s.rows(split))
  counts = s.unigram_counts()
  for split_i, split in enumerate(store.SPLITS):
    rows = s.rows(split)
    want = sum(store.row_target_counts(rows[i], c.model.vocab_size) for i in range(len(rows)))
    np.testing.assert_array_equal(counts[split_i], want)


def test_same_store_with_two_workers_and_rerun_is_a_no_op(built, tmp_path, capsys):
  c, out = built
  two = tmp_path / "two"
  prepare.prepare_store(c, two, ["--direct_num_workers=2",
                                 "--direct_running_mode=multi_processing"])
  names = sorted(p.name for p in out.iterdir() if p.name != store.BUILD)
  assert names == sorted(p.name for p in two.iterdir() if p.name != store.BUILD)
  for name in names:
    assert (out / name).read_bytes() == (two / name).read_bytes(), name
  mtime = (two / store.INDEX).stat().st_mtime_ns
  capsys.readouterr()
  prepare.prepare_store(c, two, IN_PROCESS)
  assert "up to date" in capsys.readouterr().out
  assert (two / store.INDEX).stat().st_mtime_ns == mtime
  # a changed input file is detected and the store rebuilt, the old one replaced whole
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("alpha beta gamma\n\n" * 200)
  c2 = _config(c.data.tokenizer_path, paths=str(corpus), val_fraction=0.5)
  prepare.prepare_store(c2, two, IN_PROCESS)
  rows_before = store.TokenStore(two).index["rows"]
  os.utime(corpus, ns=(0, 0))
  corpus.write_text("delta epsilon\n\n" * 400)
  capsys.readouterr()
  prepare.prepare_store(c2, two, IN_PROCESS)
  assert "inputs changed" in capsys.readouterr().out
  assert store.TokenStore(two).index["rows"] != rows_before
  assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_training_from_a_store_resumes_bitwise(built, tmp_path):
  c, out = built
  c.data.update(store=str(out), tokenizer_path="")  # the store's tokenizer
  c.mesh.data = 2
  c.optim.update(schedule="constant", warmup_steps=0)
  devices = jax.devices()[:2]
  train(c, tmp_path / "straight", devices=devices)
  c.train.steps = 4
  train(c, tmp_path / "resumed", devices=devices)
  c.train.steps = 8
  train(c, tmp_path / "resumed", devices=devices)
  assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
  # the workdir holds the store's tokenizer
  assert (tmp_path / "straight" / "tokenizer.model").read_bytes() == \
      (out / store.TOKENIZER).read_bytes()


def test_mixture_proportions_and_resume(built, tmp_path, tokenizer_path):
  c, out = built
  other = tmp_path / "other"
  corpus = tmp_path / "other.txt"
  corpus.write_text("".join(f"line {i} of the other corpus\n\n" for i in range(3000)))
  prepare.prepare_store(_config(tokenizer_path, paths=str(corpus)), other, IN_PROCESS)
  stores, weights = store.open_stores(f"{out},{other}", "3,1")
  assert weights == [0.75, 0.25]
  mix = store.Mixture(stores, weights, "train")
  first = {tuple(store.TokenStore(other).rows("train")[i]["inputs"])
           for i in range(len(store.TokenStore(other).rows("train")))}
  it = pipeline.train_iterator(mix, 8, seed=0)
  batches = [next(it) for _ in range(40)]
  from_other = sum(tuple(row) in first for b in batches for row in b["inputs"])
  assert from_other == 40 * 8 // 4  # one row in four
  # a restored iterator continues exactly
  it2 = pipeline.train_iterator(mix, 8, seed=0)
  for _ in range(17):
    next(it2)
  state = it2.get_state()
  it3 = pipeline.train_iterator(mix, 8, seed=0)
  it3.set_state(state)
  for want in batches[17:25]:
    np.testing.assert_array_equal(next(it3)["inputs"], want["inputs"])
  with pytest.raises(ValueError, match="2 weights for 1 stores"):
    store.open_stores(str(out), "1,2")
  with pytest.raises(ValueError, match="every weight must be > 0"):
    store.open_stores(f"{out},{other}", "1,0")


def test_store_config_errors(built, tmp_path):
  c, out = built
  c.data.store = str(out)
  c.data.seq_len = 64
  with pytest.raises(ValueError, match="seq_len=32"):
    pipeline.DOCUMENTS.prepare(c, tmp_path / "w")
  c.data.seq_len = 32
  c.train.objective = "sft"
  with pytest.raises(ValueError, match="holds pretraining rows"):
    validate(c)
  c.train.objective = "pretrain"
  c.data.store = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="is not a token store"):
    pipeline.DOCUMENTS.prepare(c, tmp_path / "w")
  c.data.store = ""
  c.data.curate.stages = "quality,spam"
  with pytest.raises(ValueError, match="'spam'"):
    validate(c)


def test_prepare_replaces_only_its_own_stores(tmp_path, tokenizer_path):
  c = _config(tokenizer_path)
  users = tmp_path / "users"
  users.mkdir()
  (users / "thesis.tex").write_text("years of work")
  with pytest.raises(ValueError, match=r"users' is a directory that is not a token store"):
    prepare.prepare_store(c, users, IN_PROCESS)
  assert (users / "thesis.tex").read_text() == "years of work" and len(list(users.iterdir())) == 1
  (tmp_path / "a_file").write_text("keep me")
  with pytest.raises(ValueError, match=r"a_file' is a file, not a directory"):
    prepare.prepare_store(c, tmp_path / "a_file", IN_PROCESS)
  assert (tmp_path / "a_file").read_text() == "keep me"
  assert not list(tmp_path.glob(".a_file*")) and not list(tmp_path.glob(".users*"))
  (tmp_path / ".out.partial").mkdir()  # not ours, in the way of the staging directory
  (tmp_path / ".out.partial" / "notes").write_text("mine")
  with pytest.raises(ValueError, match=r"\.out\.partial is in the way"):
    prepare.prepare_store(c, tmp_path / "out", IN_PROCESS)
  assert (tmp_path / ".out.partial" / "notes").read_text() == "mine"


def test_a_damaged_store_is_refused_naming_the_file(built, tmp_path):
  _, out = built
  work = tmp_path / "s"

  def fresh():
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(out, work)
    return work

  store.TokenStore(fresh())  # verifies
  index = json.loads((work / store.INDEX).read_text())
  index["shards"]["train"][0]["rows"] = 4  # an edit
  (work / store.INDEX).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"index.json does not match its checksum: it was edited"):
    store.TokenStore(work)
  (fresh() / store.INDEX).write_text((out / store.INDEX).read_text()[:300])
  with pytest.raises(ValueError, match=r"index.json is not valid JSON \(truncated or damaged"):
    store.TokenStore(work)
  shard = fresh() / index["shards"]["train"][0]["file"]
  shard.write_bytes(shard.read_bytes()[:1000])
  with pytest.raises(ValueError, match=rf"{shard.name} has 1,000 bytes, the store's index says"):
    store.TokenStore(work)
  (fresh() / store.TOKENIZER).write_bytes(b"another tokenizer")
  with pytest.raises(ValueError, match=r"tokenizer.model is not the tokenizer the store's rows"):
    store.TokenStore(work)


def test_compressed_jsonl_sources(tmp_path):
  zstandard = pytest.importorskip("zstandard")
  lines = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)).encode()
  (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
  (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
  cfg = tiny_config().data
  cfg.update(source="jsonl", paths=str(tmp_path / "*.jsonl.*"))
  assert list(sources.documents(cfg)) == [f"doc {i}" for i in range(5)] * 2
  long = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(500)).encode()
  packed = zstandard.ZstdCompressor().compress(long)
  (tmp_path / "b.jsonl.zst").write_bytes(packed[:len(packed) // 2])
  with pytest.raises(ValueError, match=r"b.jsonl.zst: the zstd stream ends inside a frame: the "
                                       r"file is truncated"):
    list(sources.documents(cfg))
  (tmp_path / "b.jsonl.zst").unlink()
  packed = gzip.compress(long)
  (tmp_path / "a.jsonl.gz").write_bytes(packed[:len(packed) // 2])
  with pytest.raises(ValueError, match=r"a.jsonl.gz: cannot decompress it \(EOFError.*truncated"):
    list(sources.documents(cfg))


CONFIG_FILE = """
from tests.helpers import tiny_config

def get_config():
  c = tiny_config()
  c.data.update(tokenizer_path={tokenizer!r}, store_shards=2)
  return c
"""


def test_prepare_command_line(tmp_path, tokenizer_path):
  cfg = tmp_path / "config.py"
  cfg.write_text(CONFIG_FILE.format(tokenizer=tokenizer_path))
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "llm.data.prepare", f"--config={cfg}"]
  ok = subprocess.run(base + [f"--output={tmp_path / 'store'}", *IN_PROCESS], env=env, cwd=ROOT,
                      capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "prepare: wrote" in ok.stdout
  assert store.TokenStore(tmp_path / "store").index["rows"]["train"] > 0
  bad = subprocess.run(base + [f"--output={tmp_path / 'bad'}", "--config.data.curate.stages=spam",
                               *IN_PROCESS], env=env, cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: data.curate.stages='spam' names")
  assert not (tmp_path / "bad").exists()
  # a data error met by a Beam worker: one line naming the file and line, no traceback
  (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
  broken = subprocess.run(base + [f"--output={tmp_path / 'broken'}", "--config.data.source=jsonl",
                                  f"--config.data.paths={tmp_path / 'docs.jsonl'}", *IN_PROCESS],
                          env=env, cwd=ROOT, capture_output=True, text=True)
  assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr[-3000:]
  assert broken.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp_path / 'docs.jsonl'}:2: 'text' (data.jsonl_key) holds a number (5)")
  assert not (tmp_path / "broken").exists()
