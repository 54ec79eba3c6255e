"""Unpaired examples for KTO: JSONL -> (prompt, completion, desirable?) -> packed rows.

Formats (TRL's conventions): `prompt` (a string or a list of messages) with one
`completion` (a string or assistant messages) and a boolean `label` (desirable or not);
or a preference pair (any format of llm.data.preference), which becomes two examples, the
chosen completion desirable and the rejected one not (TRL's unpair_preference_dataset).

Tokens as TRL 1.16 counts them: the prompt rendered with the generation prompt, the whole
conversation rendered, and the completion every token after their common prefix.

With `mismatched=True` (KTO's KL estimate) each example also gets a KL sequence: its own
prompt followed by the previous example's completion (file order, cyclic within the
split; TRL rotates completions by one within each batch), whose log-probabilities under
the policy and the reference estimate the KL term.

Rows: examples packed in file order, each sequence its own segment. Per token,
`example_ids` numbers a row's examples from 1 (0: padding), `label` is 1 on a desirable
example's sequences, `kl` is 1 on KL sequences; the loss mask marks completion tokens.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from llm.data import chat
from llm.data.packing import PackedExamples, assign_rows, empty_rows, place, split
from llm.data.pipeline import Corpus, Reader
from llm.data.preference import _as_messages, to_pair
from llm.data.sources import records

# the [B, T] arrays rows of unpaired examples hold besides the packed rows' own
UNPAIRED_FIELDS = {"example_ids": "int32", "label": "int32", "kl": "int32"}


def to_examples(record, where: str = "example") -> list[tuple[list[dict], list[dict], bool]]:
  """[(prompt messages, completion messages, desirable)] of one record."""
  if isinstance(record, dict) and "chosen" in record and "rejected" in record:
    chosen, rejected = to_pair(record, where)
    shared = len(chosen) - 1
    return [(chosen[:shared], chosen[shared:], True), (rejected[:shared], rejected[shared:],
                                                       False)]
  if not isinstance(record, dict) or not {"prompt", "completion", "label"} <= set(record):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: an unpaired example has 'prompt', 'completion' and 'label' "
                     f"(or is a preference pair: 'chosen' and 'rejected'); got {keys}")
  if not isinstance(record["label"], bool):
    raise ValueError(f"{where}: 'label' must be true (desirable) or false, got "
                     f"{json.dumps(record['label'])[:40]}")
  prompt = _as_messages(record["prompt"], "user", where, "prompt")
  completion = _as_messages(record["completion"], "assistant", where, "completion")
  chat.to_messages({"messages": prompt + completion}, where)  # the chat examples' checks
  if completion[-1]["role"] != "assistant":
    raise ValueError(f"{where}: a completion must end with an assistant message")
  return [(prompt, completion, record["label"])]


def read_examples(data_cfg) -> list[tuple[list[dict], list[dict], bool]]:
  out = [e for where, record in records(data_cfg) for e in to_examples(record, where)]
  if not out:
    raise ValueError(f"data.paths={data_cfg.paths!r} holds no examples")
  return out


def tokenize(examples, tokenizer, data_cfg):
  """([(prompt ids, completion ids, desirable)], Counter of dropped examples by reason)."""
  template = chat.template_for(data_cfg.chat, tokenizer)
  variables = chat.special_token_vars(tokenizer)

  out, dropped = [], Counter()
  for prompt, completion, desirable in examples:
    if not completion[-1]["content"].strip():
      dropped["an empty completion"] += 1
      continue
    p = chat.render_ids(tokenizer, template, prompt, variables, add_generation_prompt=True)
    whole = chat.render_ids(tokenizer, template, prompt + completion, variables)
    start = chat.common_prefix_length(p, whole)
    if start == 0 or start == len(whole):
      dropped["no prompt or no completion token"] += 1
      continue
    out.append((whole[:start], whole[start:], desirable))
  return out, dropped


def sequences(tokenized, mismatched: bool):
  """Per example, its sequences as (ids, completion mask, is_kl): the example itself and,
  with `mismatched`, its prompt with the previous example's completion."""
  out = []
  for i, (prompt, completion, _) in enumerate(tokenized):
    seqs = [(np.concatenate([prompt, completion]), len(prompt), 0)]
    if mismatched:
      other = tokenized[i - 1][1]  # (i = 0: the last one's)
      seqs.append((np.concatenate([prompt, other]), len(prompt), 1))
    out.append([(ids, np.arange(len(ids)) >= start, kl) for ids, start, kl in seqs])
  return out


def pack(tokenized, seq_len: int, mismatched: bool) -> dict[str, np.ndarray]:
  """Rows holding whole examples (with their KL sequences), in order."""
  per_example = sequences(tokenized, mismatched)
  rows = assign_rows([sum(len(ids) - 1 for ids, _, _ in seqs) for seqs in per_example],
                     seq_len)
  out = empty_rows(len(rows), seq_len, UNPAIRED_FIELDS)
  for row, members in enumerate(rows):
    pos = segment = 0
    for example_in_row, i in enumerate(members, 1):
      for ids, mask, kl in per_example[i]:
        segment += 1
        span = place(out, row, pos, segment, ids, mask)
        out["example_ids"][row, span] = example_in_row
        out["label"][row, span] = int(tokenized[i][2])
        out["kl"][row, span] = kl
        pos = span.stop
  return out


def _fitting(tokenized, seq_len: int, mismatched: bool):
  """(the examples whose sequences fit one row, how many did not); dropping one changes
  a neighbour's KL sequence, so until none is over."""
  dropped = 0
  while True:
    over = [sum(len(ids) - 1 for ids, _, _ in seqs) > seq_len
            for seqs in sequences(tokenized, mismatched)]
    if not any(over):
      return tokenized, dropped
    dropped += sum(over)
    tokenized = [t for t, o in zip(tokenized, over) if not o]


class UnpairedExamples(Reader):
  """Unpaired examples (data.paths) for KTO, with their KL sequences when `mismatched(config)`;
  the last data.val_fraction held out."""

  reads = "unpaired examples"
  chat = True

  def __init__(self, mismatched=lambda config: True):
    self.mismatched = mismatched

  def texts(self, config):
    return (m["content"] for p, c, _ in read_examples(config.data) for m in p + c)

  def read(self, config, workdir, tokenizer) -> Corpus:
    d = config.data
    examples = read_examples(d)
    cut = split(len(examples), d)
    mismatched = self.mismatched(config)
    parts, dropped = [], Counter()
    for chunk in (examples[:cut], examples[cut:]):
      tokenized, why = tokenize(chunk, tokenizer, d)
      dropped += why
      tokenized, n_over = _fitting(tokenized, d.seq_len, mismatched)
      if n_over:
        dropped[f"over data.seq_len={d.seq_len} tokens (with its KL sequence)"] += n_over
      parts.append(tokenized)
    train, val = parts
    reasons = "".join(f"; {n:,} {why}" for why, n in sorted(dropped.items()))
    desirable = sum(t[2] for t in train)
    print(f"unpaired examples: {len(train):,} train ({desirable:,} desirable, "
          f"{len(train) - desirable:,} undesirable), {len(val):,} validation; dropped "
          f"{sum(dropped.values()):,}{reasons}", flush=True)
    if len(train) < 2 or not val:
      raise ValueError("too few unpaired examples are left in the train or the validation "
                       "split (see the counts above)")
    return Corpus(tokenizer, PackedExamples(pack(train, d.seq_len, mismatched)),
                  PackedExamples(pack(val, d.seq_len, mismatched)), float("nan"))
