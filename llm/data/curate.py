"""Curation stages for `python -m llm.data.prepare` (`data.curate.stages`), as plain
functions of one document; llm/data/prepare.py runs them inside an Apache Beam pipeline.

They run in this order, whatever order `stages` lists them in (STAGES):

* `quality`: Gopher-style heuristics (Rae et al. 2021, appendix A) with C4's line rules;
  a document breaking any rule is dropped and counted under that rule's name (RULES).
* `language`: language identification with lingua (an offline model that ships in the
  pip package); a document is kept when its most likely language is one of
  `curate.languages` with confidence >= `curate.language_min_confidence`.
* `exact_dedup`: documents with the same normalised text (NFKC, lower case, whitespace
  collapsed) are duplicates; the first in corpus order is kept.
* `near_dedup`: MinHash (datasketch) over word shingles and LSH banding; two documents in
  one band bucket whose estimated Jaccard similarity is >= `curate.near_dedup_threshold`
  are near-duplicates, and of each such pair the later one in corpus order is dropped.
* `pii`: e-mail addresses, phone numbers and IP addresses are replaced by <EMAIL>,
  <PHONE> and <IP_ADDRESS>.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import re
import struct
import unicodedata

import numpy as np

STAGES = ("quality", "language", "exact_dedup", "near_dedup", "pii")
FILTERS = ("quality", "language")  # per-document decisions
DEDUP = ("exact_dedup", "near_dedup")  # decisions over the whole corpus


def selected(stages: str) -> list[str]:
  """The stages named in `curate.stages` (comma-separated), in the order they run."""
  names = [s.strip() for s in stages.split(",") if s.strip()]
  for name in names:
    if name not in STAGES:
      raise ValueError(f"data.curate.stages names {name!r}; the stages are {', '.join(STAGES)}")
  return [s for s in STAGES if s in names]


# --- quality ---------------------------------------------------------------------------

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_BULLETS = ("-", "*", "\u2022", "\u2023", "\u25e6", "\u2043", "\u2219", "\u25aa", "\u25cf")
_ELLIPSES = ("...", "\u2026")
_WORD = re.compile(r"\S+")


def _duplicate_fraction(items: list[str]) -> tuple[float, float]:
  """(fraction of items that repeat an earlier one, fraction of their characters)."""
  seen, dup_n, dup_chars = set(), 0, 0
  for item in items:
    if item in seen:
      dup_n += 1
      dup_chars += len(item)
    seen.add(item)
  total_chars = sum(len(i) for i in items)
  return dup_n / max(len(items), 1), dup_chars / max(total_chars, 1)


def _top_ngram_fraction(words: list[str], n: int) -> float:
  """Characters of the most frequent word n-gram (counted at every occurrence) over all
  word characters."""
  if len(words) < n:
    return 0.0
  counts = collections.Counter(zip(*(words[i:] for i in range(n))))
  gram, count = counts.most_common(1)[0]
  if count < 2:
    return 0.0
  return sum(len(w) for w in gram) * count / max(sum(len(w) for w in words), 1)


def _duplicate_ngram_fraction(words: list[str], n: int) -> float:
  """Characters of words inside an n-gram that occurred before, over all word characters."""
  if len(words) < n:
    return 0.0
  seen, covered = set(), np.zeros(len(words), bool)
  for i in range(len(words) - n + 1):
    gram = tuple(words[i:i + n])
    if gram in seen:
      covered[i:i + n] = True
    seen.add(gram)
  lengths = np.array([len(w) for w in words])
  return float(lengths[covered].sum() / max(lengths.sum(), 1))


def quality_failure(text: str, c) -> str | None:
  """The name of the first quality rule `text` breaks (RULES), or None when it passes.
  `c` is config.data.curate."""
  words = _WORD.findall(text)
  n = len(words)
  if n < c.min_words:
    return "too_few_words"
  if n > c.max_words:
    return "too_many_words"
  mean_len = sum(len(w) for w in words) / n
  if not c.min_mean_word_length <= mean_len <= c.max_mean_word_length:
    return "mean_word_length"
  symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
  if symbols / n > c.max_symbol_word_ratio:
    return "symbol_word_ratio"
  if sum(any(ch.isalpha() for ch in w) for w in words) / n < c.min_alpha_word_fraction:
    return "alpha_words"
  lower = {w.lower().strip(".,;:!?\"'()") for w in words}
  if len(lower & STOP_WORDS) < c.min_stop_words:
    return "stop_words"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if lines:
    if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > c.max_bullet_lines:
      return "bullet_lines"
    if sum(line.endswith(_ELLIPSES) for line in lines) / len(lines) > c.max_ellipsis_lines:
      return "ellipsis_lines"
    dup_lines, dup_line_chars = _duplicate_fraction(lines)
    if dup_lines > c.max_duplicate_lines:
      return "duplicate_lines"
    if dup_line_chars > c.max_duplicate_line_chars:
      return "duplicate_line_chars"
  if "lorem ipsum" in text.lower():
    return "lorem_ipsum"
  for n_gram, limit in ((2, 0.20), (3, 0.18), (4, 0.16)):
    if _top_ngram_fraction(words, n_gram) > limit * c.repetition_scale:
      return f"top_{n_gram}gram"
  for n_gram, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):
    if _duplicate_ngram_fraction(words, n_gram) > limit * c.repetition_scale:
      return f"duplicate_{n_gram}gram"
  return None


RULES = ("too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio",
         "alpha_words", "stop_words", "bullet_lines", "ellipsis_lines", "duplicate_lines",
         "duplicate_line_chars", "lorem_ipsum", *(f"top_{n}gram" for n in (2, 3, 4)),
         *(f"duplicate_{n}gram" for n in range(5, 11)))


# --- language --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _detector():
  try:
    from lingua import LanguageDetectorBuilder
  except ImportError:
    raise ImportError("the language stage needs lingua (pip install -e '.[data]')") from None
  return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def language_codes() -> set[str]:
  from lingua import IsoCode639_1
  return {c.name.lower() for c in IsoCode639_1.__members__.values()}


def detect_language(text: str, max_chars: int = 2000) -> tuple[str, float]:
  """(ISO 639-1 code, confidence) of the most likely language of the text's first
  `max_chars` characters; ("", 0.0) when nothing is recognisable."""
  values = _detector().compute_language_confidence_values(text[:max_chars])
  if not values or values[0].value <= 0:
    return "", 0.0
  return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)


def language_failure(text: str, c) -> str | None:
  code, confidence = detect_language(text)
  allowed = {x.strip().lower() for x in c.languages.split(",") if x.strip()}
  if code not in allowed:
    return f"language_{code or 'unknown'}"
  if confidence < c.language_min_confidence:
    return "language_low_confidence"
  return None


# --- exact and near-duplicate keys -----------------------------------------------------

def normalise(text: str) -> str:
  return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_key(text: str) -> bytes:
  """16 bytes identifying the normalised text."""
  return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def lsh_shape(c) -> tuple[int, int]:
  """(bands, rows per band): the configured ones, or datasketch's choice for the threshold
  and `near_dedup_num_perm` weighted 0.1 : 0.9 against false negatives (candidates are
  verified by their estimated similarity, so a false positive only costs a comparison;
  at threshold 0.8 and 128 permutations: 14 bands of 9 rows, which put a pair of
  similarity 0.85 into one bucket with probability 0.975)."""
  if c.near_dedup_bands and c.near_dedup_rows:
    return c.near_dedup_bands, c.near_dedup_rows
  from datasketch.lsh import _optimal_param
  return _optimal_param(c.near_dedup_threshold, c.near_dedup_num_perm, 0.1, 0.9)


class MinHasher:
  """MinHash signatures of word shingles (datasketch) and their LSH band keys."""

  def __init__(self, c, seed: int = 1):
    from datasketch import MinHash
    self._minhash = MinHash
    self.num_perm, self.shingle = c.near_dedup_num_perm, c.near_dedup_shingle
    self.bands, self.rows = lsh_shape(c)
    self._template = MinHash(num_perm=self.num_perm, seed=seed, scheme="affine32")

  def signature(self, text: str) -> np.ndarray:
    words = normalise(text).split()
    k = self.shingle
    grams = {" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))}
    m = self._minhash(num_perm=self.num_perm, permutations=self._template.permutations,
                      scheme="affine32")
    m.update_batch(grams)
    return m.hashvalues.astype(np.uint64)

  def band_keys(self, signature: np.ndarray) -> list[bytes]:
    """One key per band: the band's number and a hash of its rows."""
    return [struct.pack("<H", b) + hashlib.blake2b(
        signature[b * self.rows:(b + 1) * self.rows].tobytes(), digest_size=8).digest()
            for b in range(self.bands)]


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
  """The MinHash estimate of two documents' shingle Jaccard similarity."""
  return float(np.mean(sig_a == sig_b))


def near_duplicates_in_bucket(members: list[tuple], threshold: float) -> list[tuple]:
  """Keys of the documents in one LSH bucket ([(doc key, signature)]) that are
  near-duplicates of an earlier document in corpus order."""
  members = sorted(members, key=lambda m: m[0])
  out = []
  for j in range(1, len(members)):
    if any(jaccard(members[i][1], members[j][1]) >= threshold for i in range(j)):
      out.append(members[j][0])
  return out


# --- PII -------------------------------------------------------------------------------

PII_PATTERNS = {
    "EMAIL": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "IP_ADDRESS": re.compile(
        r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"
        r"|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"),
    "PHONE": re.compile(
        r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}"
        r"(?![\w.]?\d)"),
}


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
  """The text with e-mail addresses, IP addresses and phone numbers replaced by <EMAIL>,
  <IP_ADDRESS> and <PHONE>, and how many of each were replaced."""
  counts = {}
  for name, pattern in PII_PATTERNS.items():  # e-mails first: they may hold digits
    text, n = pattern.subn(f"<{name}>", text)
    counts[name] = n
  return text, counts
