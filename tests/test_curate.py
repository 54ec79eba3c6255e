"""Curation stages (llm.data.curate), each measured on constructed data, and their counts
in a store built by the Beam pipeline."""

import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llm.data import curate, prepare, store
from tests.helpers import tiny_config

pytest.importorskip("datasketch")
pytest.importorskip("lingua")

ENGLISH = ("The history of the town is long and it has been told many times by the people "
           "who have lived there. They say that the river was the reason the first settlers "
           "came to the valley, and that the mill they built with their own hands is still "
           "standing at the edge of the old market square today.")


def _curate_cfg(**kw):
  c = tiny_config().data.curate
  c.update(**kw)
  return c


def test_quality_rules_each_fire():
  c = _curate_cfg()
  assert curate.quality_failure(ENGLISH, c) is None
  words = ENGLISH.split()
  cases = {
      "too_few_words": "the cat and the dog",
      "too_many_words": " ".join((words * 2000)[:100_001]),
      "mean_word_length": " ".join(["a", "of", "to", "the", "and", "be", "with"] * 10),
      "symbol_word_ratio": ENGLISH + " #" * 10,
      "alpha_words": ENGLISH + " 10 20 30 40 50 60 70 80 90 100 110 120" * 2,
      "stop_words": " ".join(f"word{i}x" for i in range(60)).replace("x", "abc"),
      "bullet_lines": "\n".join(f"- {' '.join(words[i:i + 6])}" for i in range(0, 60, 6)),
      "ellipsis_lines": "\n".join(f"{' '.join((words * 2)[i:i + 20])}..."
                                   for i in range(0, 100, 20)),
      "duplicate_lines": "\n".join([ENGLISH] + ["the same line"] * 5 + [w for w in words[:4]]),
      "duplicate_line_chars": "\n".join([ENGLISH, ENGLISH[:150], ENGLISH[:150], *words[:4]]),
      "lorem_ipsum": ENGLISH + " lorem ipsum dolor sit amet",
      "top_2gram": ENGLISH + " the river" * 40,
      "duplicate_5gram": " ".join(words[:30] + words[:30] + words[30:40]),
  }
  for rule, text in cases.items():
    assert rule in curate.RULES
    assert curate.quality_failure(text, c) == rule, rule


def test_language_and_pii():
  c = _curate_cfg(languages="en,fr")
  assert curate.language_failure(ENGLISH, c) is None
  assert curate.language_failure("Le chat est sur la table et il regarde les oiseaux dans le "
                                 "jardin pendant que nous mangeons.", c) is None
  assert curate.language_failure("Der Hund läuft schnell über die grüne Wiese und bellt die "
                                 "Vögel im Garten an.", c) == "language_de"
  text = ("Write to jane.doe@example.co.uk or call +1 415-555-0132 / (020) 7946 0958; the server "
          "is 192.168.10.254, not version 3.11.2, built in 2024 with 1,000 users.")
  redacted, counts = curate.redact_pii(text)
  assert redacted == ("Write to <EMAIL> or call <PHONE> / <PHONE>; the server is <IP_ADDRESS>, "
                      "not version 3.11.2, built in 2024 with 1,000 users.")
  assert counts == {"EMAIL": 1, "IP_ADDRESS": 1, "PHONE": 2}


def _random_doc(rng, lexicon, n=300):
  return " ".join(rng.choice(lexicon, n))


def test_pipeline_dedup_recall_precision_and_counts(tmp_path, tokenizer_path):
  """Planted exact and near duplicates among unique documents, all stages on."""
  rng = np.random.default_rng(0)
  # English words (the Python documentation's), so that the language stage keeps them
  topics = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_text()
  lexicon = sorted({w.lower() for w in re.findall(r"\b[a-zA-Z]{3,10}\b", topics)})
  docs, kind = [], []  # kind: unique | exact | near (the later copies are the duplicates)
  for _ in range(120):
    docs.append(_random_doc(rng, lexicon))
    kind.append("unique")
  for i in range(40):  # near duplicates: 1% of words replaced (Jaccard of 5-shingles ~0.9)
    words = docs[i].split()
    for j in rng.choice(len(words), 3, replace=False):
      words[j] = str(rng.choice(lexicon))
    docs.append(" ".join(words))
    kind.append("near")
    shingles = [{" ".join(w[k:k + 5]) for k in range(len(w) - 4)}
                for w in (docs[i].split(), words)]
    assert len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1]) > 0.85
  for i in range(60, 80):  # not near duplicates: half of a document (Jaccard ~0.33)
    docs.append(" ".join(docs[i].split()[:150]) + " " + _random_doc(rng, lexicon, 150))
    kind.append("unique")
  for i in range(40, 60):  # exact duplicates up to case and whitespace
    docs.append("  " + docs[i].upper().replace(" ", "\n ") + " ")
    kind.append("exact")
  docs.append("Short spam.")  # quality: too few words
  kind.append("quality")
  docs.append(" ".join(["Der Hund läuft schnell über die grüne Wiese und bellt."] * 10))
  kind.append("language")
  docs.append(ENGLISH + " Mail me at someone@example.org today.")
  kind.append("pii")
  order = rng.permutation(len(docs))  # duplicates before or after their originals
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in order))
  c = tiny_config()
  c.data.update(source="jsonl", paths=str(path), tokenizer_path=tokenizer_path, store_shards=2,
                val_fraction=0.2)
  c.data.curate.update(stages="pii,near_dedup,exact_dedup,quality,language", min_words=20,
                       min_stop_words=0, repetition_scale=10.0, min_alpha_word_fraction=0.5)
  out = tmp_path / "store"
  index = prepare.prepare_store(c, out, ["--direct_num_workers=1",
                                         "--direct_running_mode=in_memory"])
  removed = [json.loads(line) for f in sorted((out / store.REMOVED).glob("*.jsonl"))
             for line in open(f)]
  by_stage = {}
  for r in removed:
    by_stage.setdefault(r["stage"], []).append(kind[order[r["document"]]])
  assert len(docs) == 203
  assert by_stage["quality"] == ["quality"]
  assert by_stage["language"] == ["language"]
  # exact: one of each planted pair removed, the first in file order kept
  n_exact_pairs = 20
  assert len(by_stage["exact_dedup"]) == n_exact_pairs
  # near: each planted pair is (original, copy); which one is removed depends on file order
  pairs = {i: 120 + i for i in range(40)}  # docs[120 + i] is a copy of docs[i]
  partner = {**{a: b for a, b in pairs.items()}, **{b: a for a, b in pairs.items()}}
  near_removed = [order[r["document"]] for r in removed if r["stage"] == "near_dedup"]
  true_pos = [d for d in near_removed if d in partner]
  precision = len(true_pos) / max(len(near_removed), 1)
  recall = len({min(d, partner[d]) for d in true_pos}) / len(pairs)
  print(f"near-duplicate precision {precision:.3f} recall {recall:.3f}")
  assert precision >= 0.9 and recall >= 0.9
  cur = index["curation"]
  assert list(cur) == ["quality", "language", "exact_dedup", "near_dedup", "pii"]
  assert cur["quality"]["documents_in"] == len(docs)
  assert cur["exact_dedup"]["documents_removed"] == n_exact_pairs
  assert cur["near_dedup"]["documents_removed"] == len(near_removed)
  for a, b in zip(list(cur.values()), list(cur.values())[1:]):
    assert b["documents_in"] == a["documents_kept"]
    assert b["characters_in"] == a["characters_kept"]
  assert cur["pii"]["reasons"]["EMAIL"] == 1 and cur["pii"]["documents_changed"] == 1
  kept = cur["pii"]["documents_kept"]
  assert index["documents"]["train"] + index["documents"]["val"] == kept
