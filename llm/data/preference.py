"""Preference pairs for DPO and reward models: JSONL -> two conversations per pair -> packed rows.

Formats (TRL's conventions): `prompt` (a string, or a list of messages; `messages` is
accepted for it) with `chosen` and `rejected` completions (strings, or lists of
assistant messages); or `chosen` / `rejected` as whole conversations sharing their
prompt (TRL's implicit prompt). Both conversations are rendered with the run's chat
template and only the completion's tokens are in the loss mask: as TRL counts them, every
token the template renders after the prompt (the shared messages with the generation
prompt), end-of-turn token and trailing text included; prompt tokens are masked out.

Rows: a pair's chosen and rejected sequences sit in the same row as two segments, pairs
packed in file order. Per token, `pair_ids` numbers the pairs of a row from 1 (0 =
padding) and `chosen` is 1 on the chosen sequence, 0 on the rejected one; the objective
sums log-probabilities per (pair, side). For a reward model (`score_last=True`) every
token of a sequence is an input, and the loss mask marks its last token alone: the
position whose hidden state is scored (HF's last non-pad token).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np

from llm.data import chat
from llm.data.pipeline import Corpus, Reader
from llm.data.packing import PackedExamples, assign_rows, empty_rows, place, split
from llm.data.sources import records


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, list):
    return list(value)
  raise ValueError(f"{where}: {field!r} must be a string or a list of messages, got "
                   f"{json.dumps(value)[:80]}")


def to_pair(record: dict, where: str = "example") -> tuple[list[dict], list[dict]]:
  """(chosen conversation, rejected conversation) of one preference example."""
  if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: a preference example needs 'chosen' and 'rejected' (and "
                     f"usually 'prompt'); got {keys}")
  prompt_value = record.get("prompt", record.get("messages"))
  prompt = [] if prompt_value is None else _as_messages(prompt_value, "user", where, "prompt")
  chosen = prompt + _as_messages(record["chosen"], "assistant", where, "chosen")
  rejected = prompt + _as_messages(record["rejected"], "assistant", where, "rejected")
  for conv in (chosen, rejected):
    chat.to_messages({"messages": conv}, where)  # the same checks as chat examples
    if conv[-1]["role"] != "assistant":
      raise ValueError(f"{where}: a completion must end with an assistant message")
  if prompt_value is None and chosen[:-1] != rejected[:-1]:  # TRL's implicit prompt
    turn = next(i for i, (a, b) in enumerate(zip(chosen[:-1] + [None], rejected[:-1] + [None]))
                if a != b)
    raise ValueError(f"{where}: 'chosen' and 'rejected' are whole conversations (no 'prompt') "
                     f"whose prompts differ at message {turn}; both sides must share every "
                     "message but the last assistant reply, or give 'prompt' separately")
  return chosen, rejected


def _why_meaningless(chosen: list[dict], rejected: list[dict]) -> str | None:
  """Why a pair teaches nothing (None: it is fine): an empty completion, or the same
  completion on both sides."""
  if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
    return "an empty completion"
  if chosen == rejected:
    return "chosen identical to rejected"
  return None


def _margin(record: dict, where: str) -> float:
  """TRL's optional per-pair `margin` for reward models (default 0)."""
  value = record.get("margin", 0.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{where}: 'margin' must be a finite number, got {json.dumps(value)[:80]}")
  return float(value)


def pairs(data_cfg, with_margins: bool = False) -> list[tuple]:
  """(chosen conversation, rejected conversation) per example, plus its margin when
  `with_margins`."""
  out = [to_pair(record, where) + ((_margin(record, where),) if with_margins else ())
         for where, record in records(data_cfg)]
  if not out:
    raise ValueError(f"data.paths={data_cfg.paths!r} holds no preference pairs")
  return out


def tokenize_pairs(convs, tokenizer, data_cfg, score_last: bool = False):
  """([(chosen ids, chosen mask, rejected ids, rejected mask)], Counter of dropped pairs by
  reason): a pair is dropped when a completion is empty (whitespace), both completions
  are the same, or both sides would not fit one row. With `score_last` the ids get a
  padding token so that the real last token is an input too (see pack_pairs)."""
  template = chat.template_for(data_cfg.chat, tokenizer)
  out, dropped = [], Counter()
  for item in convs:  # (chosen, rejected[, margin])
    chosen, rejected = item[:2]
    why = _why_meaningless(chosen, rejected)
    if why:
      dropped[why] += 1
      continue
    c_ids, c_mask, r_ids, r_mask = _tokenize_pair(tokenizer, template, chosen, rejected)
    if score_last:
      c_ids, c_mask, r_ids, r_mask = _scored_at_last(c_ids, c_mask, r_ids, r_mask)
    if (len(c_ids) - 1) + (len(r_ids) - 1) > data_cfg.seq_len:
      dropped[f"both sides over data.seq_len={data_cfg.seq_len} tokens"] += 1
      continue
    if not (c_mask[1:].any() and r_mask[1:].any()):
      dropped["no completion token in the loss"] += 1
      continue
    out.append((c_ids, c_mask, r_ids, r_mask) + tuple(item[2:]))
  return out, dropped


def _tokenize_pair(tokenizer, template: str, chosen: list[dict], rejected: list[dict]):
  """(chosen ids, mask, rejected ids, mask) as TRL 1.16 tokenizes a conversational pair:
  the prompt (the messages both sides share) rendered with the generation prompt, each
  side rendered whole, and the completion every token after the longest prefix the
  prompt's tokens share with both sides: what the template renders after the prompt,
  end-of-turn and trailing text included (ChatML: "<|im_end|>\n")."""
  variables = chat.special_token_vars(tokenizer)
  shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                min(len(chosen), len(rejected)))

  prompt = chat.render_ids(tokenizer, template, chosen[:shared], variables,
                          add_generation_prompt=True)
  c_ids = chat.render_ids(tokenizer, template, chosen, variables)
  r_ids = chat.render_ids(tokenizer, template, rejected, variables)
  start = min(chat.common_prefix_length(prompt, c_ids), chat.common_prefix_length(prompt, r_ids))
  return (c_ids, np.arange(len(c_ids)) >= start, r_ids, np.arange(len(r_ids)) >= start)


def _scored_at_last(*ids_and_masks):
  """Appends a padding id to each sequence; the mask then marks only the position whose
  input is the last real token (a completion that is empty is left empty)."""
  out = []
  for ids, mask in zip(ids_and_masks[::2], ids_and_masks[1::2]):
    last = np.zeros(len(ids) + 1, bool)
    last[-1] = mask[1:].any()
    out += [np.append(ids, 0).astype(np.int32), last]
  return out


def pack_pairs(tokenized, seq_len: int) -> dict[str, np.ndarray]:
  """Rows with both sides of each pair, pairs in order, a new row when one does not fit.
  Items with a fifth element (a reward model's margin) also fill a float "margin" row."""
  rows = assign_rows([len(t[0]) - 1 + len(t[2]) - 1 for t in tokenized], seq_len)
  out = empty_rows(len(rows), seq_len, ("pair_ids", "chosen"))
  with_margins = any(len(t) > 4 for t in tokenized)
  if with_margins:
    out["margin"] = np.zeros((len(rows), seq_len), np.float32)
  for row, members in enumerate(rows):
    pos, segment = 0, 0
    for pair_in_row, i in enumerate(members, 1):
      c_ids, c_mask, r_ids, r_mask = tokenized[i][:4]
      for ids, mask, is_chosen in ((c_ids, c_mask, 1), (r_ids, r_mask, 0)):
        segment += 1
        span = place(out, row, pos, segment, ids, mask)
        out["pair_ids"][row, span] = pair_in_row
        out["chosen"][row, span] = is_chosen
        if with_margins:
          out["margin"][row, span] = tokenized[i][4] if len(tokenized[i]) > 4 else 0.0
        pos = span.stop
  return out


class PreferencePairs(Reader):
  """Preference pairs (data.paths), both sides of a pair in one row; with `score_last`
  (a reward model) each side's last token alone is in the loss mask and TRL's `margin`
  column is read. The last data.val_fraction of the pairs is held out."""

  reads = "preference pairs"
  chat = True

  def __init__(self, score_last: bool = False):
    self.score_last = score_last

  def texts(self, config):
    return (m["content"] for pair in pairs(config.data) for conv in pair[:2] for m in conv)

  def read(self, config, workdir, tokenizer) -> Corpus:
    d = config.data
    convs = pairs(d, with_margins=self.score_last)  # (reward models read TRL's margins)
    cut = split(len(convs), d, "pair(s)")
    train, dropped_train = tokenize_pairs(convs[:cut], tokenizer, d, self.score_last)
    val, dropped_val = tokenize_pairs(convs[cut:], tokenizer, d, self.score_last)
    dropped = dropped_train + dropped_val
    reasons = "".join(f"; {n:,} {why}" for why, n in sorted(dropped.items()))
    print(f"preference pairs: {len(train):,} train, {len(val):,} validation; dropped "
          f"{sum(dropped.values()):,}{reasons}", flush=True)
    if not train or not val:
      raise ValueError("no preference pair is left in the train or the validation split")
    return Corpus(tokenizer, PackedExamples(pack_pairs(train, d.seq_len)),
                  PackedExamples(pack_pairs(val, d.seq_len)), float("nan"))
