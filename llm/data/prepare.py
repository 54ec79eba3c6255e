"""Build a token store (llm/data/store.py) from a corpus with an Apache Beam pipeline:

  python -m llm.data.prepare --config=configs/tiny.py --output=STORE [--config.data.* ...]
      [Beam pipeline options, e.g. --direct_num_workers=4 or --runner=DataflowRunner ...]

Without runner options it runs on Beam's DirectRunner with one worker process per CPU
core. The corpus is `config.data` (source, paths, ...), cut into `data.store_shards`
shards of whole files (contiguous in the sorted file list, balanced by bytes). Each shard
is one unit of work: its files are streamed document by document, curated, tokenized
and packed into rows of `data.seq_len`, written to its own ArrayRecord files; no text
passes through a shuffle, so memory is bounded by one document and one row whatever the
corpus size. Documents go to the validation split by a hash of their place in the corpus
(`data.val_fraction` of them).

Curation (`data.curate.stages`, llm/data/curate.py): the per-document filters (quality,
language) and the deduplication keys are computed in a first pass over the shards;
exact and near duplicates are found by grouping those small keys (GroupByKey), and each
shard then receives the keys of its removed documents (CoGroupByKey) for the writing
pass. Per-stage counts of documents and characters kept and removed go into the index.

Everything a shard writes depends only on the shard, and the tokenizer is trained before
the pipeline on a deterministic sample, so the store is the same with 1 or N workers.
The index records a fingerprint of the inputs (files' paths, sizes and modification
times, the data settings, the tokenizer's hash): re-running with unchanged inputs does
nothing. A store is built in a staging directory beside STORE and swapped in when
complete; the previous store is removed only after that.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np

from llm import config as config_lib
from llm.data import curate, sources, store
from llm.data.tokenizer import check_vocab, open_tokenizer, train_tokenizer

# data settings that decide the store's content (the rest of the config does not)
DATA_KEYS = (*sources.SOURCE_KEYS, "seq_len", "val_fraction", "tokenizer_path",
             "tokenizer_model_type", "tokenizer_max_chars", "store_shards", "shuffle_seed")


def plan_shards(sizes: list[int], n_shards: int) -> list[list[int]]:
  """Contiguous groups of file indices, at most n_shards, balanced by bytes."""
  n = max(1, min(n_shards, len(sizes)))
  total = max(sum(sizes), 1)
  groups, current, done = [], [], 0
  for i, size in enumerate(sizes):
    current.append(i)
    done += size
    left_files, left_groups = len(sizes) - i - 1, n - len(groups) - 1
    if left_groups and (done >= total * (len(groups) + 1) / n or left_files == left_groups):
      groups.append(current)
      current = []
  if current:
    groups.append(current)
  return groups


def _hash01(*parts) -> float:
  """A uniform number in [0, 1) from the parts (stable across processes and runs)."""
  digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2 ** 64


def is_val(doc_key: tuple[int, int], val_fraction: float, seed: int) -> bool:
  return _hash01("val", seed, *doc_key) < val_fraction


def shard_documents(data: dict, files: list[str], file_indices: list[int]):
  """(doc key (file index, doc index), text) of a shard's non-empty documents in order."""
  src = sources.source(ml_collections.ConfigDict(data))
  for fi in file_indices:
    for di, text in enumerate(src.read(Path(files[fi]))):
      if text.strip():
        yield (fi, di), text


def tokenizer_sample(data_cfg, max_chars: int, seed: int):
  """A uniform sample of documents (bottom-k by a hash of their key) holding about
  max_chars characters, drawn from files read in a hashed order until 4 x max_chars
  characters are seen: the tokenizer never reads the whole corpus."""
  src = sources.source(data_cfg)
  order = sorted(range(len(src.files)), key=lambda i: _hash01("file", seed, str(src.files[i])))
  heap, held, seen = [], 0, 0  # heap of (-priority, key, text): the smallest priorities
  for fi in order:
    for di, text in enumerate(src.read(src.files[fi])):
      if not text.strip():
        continue
      seen += len(text)
      heapq.heappush(heap, (-_hash01("doc", seed, fi, di), fi, di, text))
      held += len(text)
      while held > max_chars and len(heap) > 1:
        held -= len(heapq.heappop(heap)[3])
    if seen >= 4 * max_chars:
      break
  return [text for *_, text in sorted(heap, key=lambda h: (h[1], h[2]))]


# --- the Beam work, one function per step; arguments are plain data (picklable) ---------

@dataclasses.dataclass(frozen=True)
class Job:
  data: dict  # config.data as a dict
  curate: dict  # config.data.curate as a dict
  files: list  # every source file (str), sorted
  n_shards: int
  staging: str
  tokenizer: str  # path of the tokenizer model in the staging directory
  vocab_size: int
  stages: tuple

  @property
  def curate_cfg(self):
    return ml_collections.ConfigDict(self.curate)


@functools.lru_cache(maxsize=4)
def _minhasher(curate_json: str):
  return curate.MinHasher(ml_collections.ConfigDict(json.loads(curate_json)))


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
  return open_tokenizer(path)


ERRORS = "errors"  # staging/errors/shard-N.txt: the data error that stopped shard N


def _record_error(job: Job, shard: int, err: Exception) -> None:
  """Keeps a worker's data error (a malformed, truncated or undecodable file) for the
  driver to report in one line, instead of letting Beam log its traceback from every
  worker; the shard then yields nothing."""
  path = Path(job.staging) / ERRORS / f"shard-{shard:05d}.txt"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(str(err).splitlines()[0] if str(err) else type(err).__name__)


DATA_ERRORS = (ValueError, OSError, UnicodeError, EOFError)


def scan_shard(task, job: Job):
  """First pass over one shard: filter decisions and dedup keys (tagged outputs)."""
  try:
    yield from _scan_shard(task, job)
  except DATA_ERRORS as e:
    _record_error(job, task[0], e)


def _scan_shard(task, job: Job):
  import apache_beam as beam
  shard, file_indices = task
  c = job.curate_cfg
  hasher = _minhasher(json.dumps(job.curate)) if "near_dedup" in job.stages else None
  for key, text in shard_documents(job.data, job.files, file_indices):
    reason = None
    if "quality" in job.stages:
      reason = curate.quality_failure(text, c)
      stage = "quality"
    if reason is None and "language" in job.stages:
      reason = curate.language_failure(text, c)
      stage = "language"
    if reason is not None:
      yield beam.pvalue.TaggedOutput("removed", (shard, (key, stage, reason)))
      continue
    if "exact_dedup" in job.stages:
      yield beam.pvalue.TaggedOutput("exact", (curate.exact_key(text), (shard, key)))
    if hasher is not None:
      signature = hasher.signature(text)
      for band in hasher.band_keys(signature):
        yield beam.pvalue.TaggedOutput("bands", (band, (shard, key, signature.tobytes())))


def exact_duplicates(item):
  """All but the first (in corpus order) of the documents sharing a normalised text."""
  _, members = item
  members = sorted(members, key=lambda m: m[1])
  for shard, key in members[1:]:
    yield shard, (key, "exact_dedup", "exact_dedup")


def near_duplicates(item, threshold: float):
  _, members = item
  if len(members) < 2:
    return
  members = [((key, shard), np.frombuffer(sig, np.uint64)) for shard, key, sig in members]
  for key, shard in curate.near_duplicates_in_bucket(members, threshold):
    yield shard, (key, "near_dedup", "near_dedup")


def write_shard(item, job: Job) -> dict:
  """Second pass over one shard: drop removed documents, redact PII, tokenize, pack,
  write the shard's train and val files; returns (and writes) the shard's counts."""
  shard, grouped = item
  (file_indices,) = grouped["task"]
  removed = {}
  for key, stage, reason in grouped["removed"]:
    key = tuple(key)
    if key not in removed or curate.STAGES.index(stage) < curate.STAGES.index(removed[key][0]):
      removed[key] = (stage, reason)
  try:
    return _write_shard(shard, file_indices, removed, job)
  except DATA_ERRORS as e:
    _record_error(job, shard, e)
    return {}


def _write_shard(shard: int, file_indices, removed: dict, job: Job) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter
  tok = _tokenizer(job.tokenizer)
  seq_len, vocab = int(job.data["seq_len"]), job.vocab_size
  staging = Path(job.staging)
  counts = {"documents": 0, "characters": 0,
            "stages": {s: {"documents_removed": 0, "characters_removed": 0, "reasons": {}}
                       for s in job.stages}}
  out = {}
  for split in store.SPLITS:
    name = store.shard_name(split, shard, job.n_shards)
    out[split] = dict(name=name, tmp=staging / f".{name}.tmp", rows=0, tokens=0, documents=0,
                      packer=store.RowPacker(seq_len, tok.bos_id, tok.eos_id),
                      targets=np.zeros(vocab, np.int64))
    out[split]["writer"] = ArrayRecordWriter(str(out[split]["tmp"]), "group_size:1")

  def emit(split, rows):
    o = out[split]
    for tokens, segments in rows:
      record = store.encode_row(tokens, segments)
      o["writer"].write(record)
      o["targets"] += store.row_target_counts(store.decode_row(record, seq_len), vocab)
      o["rows"] += 1

  batch: list[tuple[str, str]] = []
  removed_log = []  # what curation dropped, for audit: (file, document index, stage, reason)

  def flush():
    ids = tok.sp.encode([t for _, t in batch], num_threads=1)
    for (split, _), doc_ids in zip(batch, ids):
      out[split]["tokens"] += len(doc_ids) + 2
      out[split]["documents"] += 1
      emit(split, out[split]["packer"].add(doc_ids))
    batch.clear()

  for key, text in shard_documents(job.data, job.files, file_indices):
    counts["documents"] += 1
    counts["characters"] += len(text)
    if key in removed:
      stage, reason = removed[key]
      s = counts["stages"][stage]
      s["documents_removed"] += 1
      s["characters_removed"] += len(text)
      s["reasons"][reason] = s["reasons"].get(reason, 0) + 1
      removed_log.append({"file": job.files[key[0]], "document": key[1], "stage": stage,
                          "reason": reason})
      continue
    if "pii" in job.stages:
      redacted, found = curate.redact_pii(text)
      s = counts["stages"]["pii"]
      for name, n in found.items():
        s["reasons"][name] = s["reasons"].get(name, 0) + n
      s["characters_changed"] = s.get("characters_changed", 0) + (redacted != text) * len(text)
      s["documents_changed"] = s.get("documents_changed", 0) + (redacted != text)
      text = redacted
    split = "val" if is_val(key, job.data["val_fraction"], job.data["shuffle_seed"]) else "train"
    batch.append((split, text))
    if len(batch) >= 64:
      flush()
  if batch:
    flush()
  result = {"shard": shard, **counts, "splits": {}}
  for split, o in out.items():
    emit(split, o["packer"].finish())
    o["writer"].close()
    if o["rows"]:
      os.replace(o["tmp"], staging / o["name"])
    else:
      o["tmp"].unlink()
    result["splits"][split] = {"file": o["name"] if o["rows"] else None, "rows": o["rows"],
                               "tokens": o["tokens"], "documents": o["documents"]}
    np.save(staging / "counts" / f"{split}-{shard:05d}.npy", o["targets"])
  if job.stages:
    log = staging / store.REMOVED / f"removed-{shard:05d}-of-{job.n_shards:05d}.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.write_text("".join(json.dumps(r) + "\n" for r in removed_log))
  stats = staging / "counts" / f"shard-{shard:05d}.json"
  tmp = stats.with_suffix(".tmp")
  tmp.write_text(json.dumps(result, sort_keys=True))
  os.replace(tmp, stats)
  return result


def build_pipeline(pipeline, job: Job, groups: list[list[int]]):
  """The Beam graph: tasks -> [scan -> dedup groups ->] write."""
  import apache_beam as beam
  tasks = (pipeline | "shards" >> beam.Create(list(enumerate(groups)))
           | "spread" >> beam.Reshuffle())
  removing = [s for s in job.stages if s in curate.FILTERS + curate.DEDUP]
  parts = []
  if removing:
    scanned = tasks | "scan" >> beam.FlatMap(scan_shard, job).with_outputs(
        "removed", "exact", "bands")
    parts.append(scanned.removed)
    if "exact_dedup" in job.stages:
      parts.append(scanned.exact | "group texts" >> beam.GroupByKey()
                   | "exact duplicates" >> beam.FlatMap(exact_duplicates))
    if "near_dedup" in job.stages:
      parts.append(scanned.bands | "group bands" >> beam.GroupByKey()
                   | "near duplicates" >> beam.FlatMap(
                       near_duplicates, job.curate["near_dedup_threshold"]))
  removed = (parts | "all removed" >> beam.Flatten() if parts
             else pipeline | "none removed" >> beam.Create([]))
  return ({"task": tasks, "removed": removed} | "join" >> beam.CoGroupByKey()
          | "write" >> beam.Map(write_shard, job))


# --- the driver --------------------------------------------------------------------------

def fingerprint(config, files: list[Path], tokenizer_sha: str | None) -> dict:
  d = config.data
  return {"data": {k: d[k] for k in DATA_KEYS},
          "curate": d.curate.to_dict() if curate.selected(d.curate.stages) else {},
          "vocab_size": config.model.vocab_size,
          "files": sources.files_fingerprint(files),
          "tokenizer_sha256": tokenizer_sha}


def _watch(staging: Path, n_shards: int, stop: threading.Event, t0: float):
  """Console progress while the pipeline runs: shards done, tokens, tokens/s, ETA."""
  last = -1
  while not stop.wait(5.0):
    done = sorted((staging / "counts").glob("shard-*.json"))
    if len(done) == last:
      continue
    last = len(done)
    tokens = sum(sum(s["tokens"] for s in json.loads(p.read_text())["splits"].values())
                 for p in done)
    elapsed = time.time() - t0
    eta = elapsed / max(len(done), 1) * (n_shards - len(done)) if done else float("nan")
    print(f"prepare: {len(done)}/{n_shards} shards, {tokens:,} tokens, "
          f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s, ETA {eta:,.0f} s", flush=True)


def pipeline_options(argv: list[str]):
  from apache_beam.options.pipeline_options import PipelineOptions
  args = list(argv)
  if not any(a.startswith("--runner") for a in args):
    if not any(a.startswith("--direct_num_workers") for a in args):
      args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
      args.append("--default_sdk_harness_log_level=WARNING")
    if not any(a.startswith("--direct_running_mode") for a in args):
      args.append("--direct_running_mode=multi_processing")
  return PipelineOptions(args), args


def prepare_store(config, output, beam_args: list[str] = ()) -> dict:
  """Builds (or finds up to date) the store at `output`; returns its index."""
  try:
    import apache_beam as beam
  except ImportError:
    raise ImportError("llm.data.prepare runs on Apache Beam: pip install -e '.[data]'") from None
  config_lib.validate(config)
  d = config.data
  if d.store:
    raise ValueError(f"data.store={d.store!r} is set: llm.data.prepare builds a store from "
                     "data.source; leave data.store empty here")
  stages = tuple(curate.selected(d.curate.stages))
  output = Path(output)
  src = sources.source(d)
  files = src.files
  if not files:
    raise ValueError(f"{src.where} has no files")
  given_tok = Path(d.tokenizer_path) if d.tokenizer_path else None
  if given_tok and not given_tok.is_file():
    raise FileNotFoundError(f"data.tokenizer_path={d.tokenizer_path!r} does not exist")
  fp = fingerprint(config, files, store.sha256_file(given_tok) if given_tok else None)
  staging, old_copy = _check_output(output)
  if (output / store.INDEX).is_file():
    try:
      old = store.TokenStore(output).index
    except (ValueError, OSError) as e:
      print(f"prepare: rebuilding {output}: {e}", flush=True)
    else:
      if old.get("fingerprint") == fp:
        print(f"prepare: {output} is up to date ({old['rows']['train']:,} train rows); "
              "nothing to do", flush=True)
        return old
      print(f"prepare: the inputs changed since {output} was built; rebuilding", flush=True)

  t0 = time.time()
  for leftover in (staging, old_copy):  # an interrupted build's (each holds our marker)
    if leftover.exists():
      shutil.rmtree(leftover)
  (staging / "counts").mkdir(parents=True)
  (staging / store.MARKER).write_text("a token store built by llm.data.prepare\n")
  tok_path = staging / store.TOKENIZER
  if given_tok:
    shutil.copyfile(given_tok, tok_path)
    tok = open_tokenizer(tok_path)
  else:
    print(f"prepare: training a {config.model.vocab_size}-piece tokenizer on a sample of "
          f"<= {d.tokenizer_max_chars:,} characters", flush=True)
    sample = tokenizer_sample(d, d.tokenizer_max_chars, d.shuffle_seed)
    tok = train_tokenizer(sample, config.model.vocab_size, tok_path, d.tokenizer_model_type,
                          d.tokenizer_max_chars)
  check_vocab(tok, config.model.vocab_size)
  groups = plan_shards([f.stat().st_size for f in files], d.store_shards)
  job = Job(data=d.to_dict(), curate=d.curate.to_dict(), files=[str(f) for f in files],
            n_shards=len(groups), staging=str(staging), tokenizer=str(tok_path),
            vocab_size=config.model.vocab_size, stages=stages)
  options, args = pipeline_options(list(beam_args))
  print(f"prepare: {len(files):,} files in {len(groups)} shards; stages: "
        f"{', '.join(stages) or 'none'}; Beam options: {' '.join(args)}", flush=True)
  stop = threading.Event()
  watcher = threading.Thread(target=_watch, args=(staging, len(groups), stop, t0), daemon=True)
  watcher.start()
  try:
    with beam.Pipeline(options=options) as p:
      build_pipeline(p, job, groups)
  finally:
    stop.set()
  errors = sorted((staging / ERRORS).glob("shard-*.txt"))
  if errors:
    more = f" ({len(errors) - 1} more shard(s) failed too: {staging / ERRORS})" if len(
        errors) > 1 else ""
    raise ValueError(errors[0].read_text() + more)
  index = _write_index(staging, job, fp, tok, json.loads(config_lib.to_json(config)))
  (staging / store.BUILD).write_text(json.dumps(
      {"seconds": time.time() - t0, "beam_args": args, "built_at": time.time(),
       "python": sys.version.split()[0]}, indent=1))
  _swap(staging, output)
  n_tok = index["tokens"]["train"] + index["tokens"]["val"]
  secs = time.time() - t0
  print(f"prepare: wrote {output}: {index['rows']['train']:,} train / {index['rows']['val']:,} "
        f"val rows, {n_tok:,} tokens in {secs:,.1f} s ({n_tok / secs:,.0f} tokens/s)", flush=True)
  return index


def _write_index(staging: Path, job: Job, fp: dict, tok, config_dict: dict) -> dict:
  results = [json.loads((staging / "counts" / f"shard-{i:05d}.json").read_text())
             for i in range(job.n_shards)]
  counts = np.stack([sum(np.load(staging / "counts" / f"{split}-{i:05d}.npy")
                         for i in range(job.n_shards)) for split in store.SPLITS])
  np.save(staging / store.UNIGRAM, counts.astype(np.int64))
  shards = {split: [{"file": r["splits"][split]["file"], "rows": r["splits"][split]["rows"],
                     "tokens": r["splits"][split]["tokens"],
                     "bytes": (staging / r["splits"][split]["file"]).stat().st_size}
                    for r in results if r["splits"][split]["rows"]] for split in store.SPLITS}
  docs = sum(r["documents"] for r in results)
  chars = sum(r["characters"] for r in results)
  curation, docs_left, chars_left = {}, docs, chars
  for stage in job.stages:
    per = [r["stages"][stage] for r in results]
    removed_d = sum(p["documents_removed"] for p in per)
    removed_c = sum(p["characters_removed"] for p in per)
    reasons = {}
    for p in per:
      for k, v in p["reasons"].items():
        reasons[k] = reasons.get(k, 0) + v
    entry = {"documents_in": docs_left, "documents_removed": removed_d,
             "documents_kept": docs_left - removed_d, "characters_in": chars_left,
             "characters_removed": removed_c, "characters_kept": chars_left - removed_c,
             "reasons": dict(sorted(reasons.items()))}
    if stage == "pii":
      entry["documents_changed"] = sum(p.get("documents_changed", 0) for p in per)
    curation[stage] = entry
    docs_left, chars_left = docs_left - removed_d, chars_left - removed_c
  for split in store.SPLITS:
    if not shards[split]:
      raise ValueError(f"the {split} split of the store is empty ({docs:,} documents read, "
                       f"{docs_left:,} left after curation, data.val_fraction="
                       f"{job.data['val_fraction']}): use a larger corpus, another "
                       "data.val_fraction or fewer data.curate.stages")
  index = {
      "format": store.STORE_FORMAT, "seq_len": int(job.data["seq_len"]),
      "vocab_size": job.vocab_size, "tokenizer": store.TOKENIZER,
      "tokenizer_sha256": store.sha256_file(tok.path), "bos_id": tok.bos_id,
      "eos_id": tok.eos_id, "fingerprint": fp, "shards": shards,
      "rows": {s: sum(x["rows"] for x in shards[s]) for s in store.SPLITS},
      "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in store.SPLITS},
      "documents": {"read": docs, **{s: sum(r["splits"][s]["documents"] for r in results)
                                     for s in store.SPLITS}},
      "characters": chars, "curation": curation, "config": config_dict,
  }
  index["unigram_bytes"] = (staging / store.UNIGRAM).stat().st_size
  index["checksum"] = store.index_checksum(index)
  shutil.rmtree(staging / "counts")
  (staging / store.INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
  return index


def _check_output(output: Path) -> tuple[Path, Path]:
  """(staging, old-copy) paths beside `output`, after refusing to touch anything that is
  not ours: `output` may be absent, an empty directory, or a store prepare built (it
  holds the marker file); the staging and old-copy paths may be absent or ours."""
  staging = output.parent / f".{output.name}.partial"
  old_copy = output.parent / f".{output.name}.old"
  if output.exists() and not output.is_dir():
    raise ValueError(f"--output={str(output)!r} is a file, not a directory: give a new "
                     "directory (or an existing token store) to write the store to")
  if output.is_dir() and any(output.iterdir()) and not store.is_store_dir(output):
    raise ValueError(f"--output={str(output)!r} is a directory that is not a token store "
                     f"built by llm.data.prepare (it has no {store.MARKER}); prepare replaces "
                     "only its own stores: give a new or empty directory")
  for path in (staging, old_copy):
    if path.exists() and not store.is_store_dir(path):
      raise ValueError(f"{path} is in the way of --output={str(output)!r} and was not made by "
                       f"llm.data.prepare (no {store.MARKER}); move it, or choose another output")
  return staging, old_copy


def _swap(staging: Path, output: Path) -> None:
  """Staging becomes the store; the old store (if any) is deleted only afterwards."""
  old = output.parent / f".{output.name}.old"
  if output.exists():
    os.replace(output, old)  # an empty directory, or a store of ours (_check_output)
  os.replace(staging, output)
  if old.exists():
    shutil.rmtree(old)


def main(argv):
  from absl import flags

  # the module by its name, not __main__, so Beam's workers can unpickle its functions
  from llm.data import prepare
  prepare.prepare_store(flags.FLAGS.config, flags.FLAGS.output, argv[1:])


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from llm import cli
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("output", None, "The store directory to write.")
  flags.mark_flags_as_required(["config", "output"])
  cli.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
