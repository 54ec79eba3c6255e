"""Supervised fine-tuning data: JSONL chat examples -> packed rows with a loss mask.

Each example (any format of llm.data.chat) is rendered with the run's chat template and
tokenized; its targets are the next tokens and the loss mask covers the predicted tokens
the template marks as the assistant's (data.chat.loss_on). Examples are packed in file
order, several to a row of data.seq_len, each its own segment (attention never crosses
examples, positions restart), the rest of a row padded (segment 0, masked out). An
example longer than data.seq_len + 1 tokens is truncated or dropped (data.chat.overlong);
the counts are printed. The last data.val_fraction of the examples is the validation
split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llm.data import chat
from llm.data.packing import PackedExamples, assign_rows, empty_rows, place, split
from llm.data.pipeline import Corpus, Reader
from llm.data.sources import records


def conversations(data_cfg) -> list[list[dict]]:
  out = [chat.to_messages(record, where) for where, record in records(data_cfg)]
  if not out:
    raise ValueError(f"data.paths={data_cfg.paths!r} holds no examples")
  return out


@dataclasses.dataclass
class Tokenized:
  ids: list[np.ndarray]  # per example, int32
  masks: list[np.ndarray]  # per example, bool: the token is the assistant's (loss target)
  truncated: int
  dropped: int


def tokenize_examples(convs: list[list[dict]], tokenizer, data_cfg) -> Tokenized:
  template = chat.template_for(data_cfg.chat, tokenizer)
  limit = data_cfg.seq_len + 1
  ids, masks = [], []
  truncated = dropped = 0
  for messages in convs:
    example_ids, mask = chat.tokenize_chat(tokenizer, template, messages, data_cfg.chat.loss_on)
    cut = len(example_ids) > limit
    if cut:
      if data_cfg.chat.overlong == "drop":
        dropped += 1
        continue
      example_ids, mask = example_ids[:limit], mask[:limit]
    if len(example_ids) < 2 or not mask[1:].any():
      dropped += 1  # nothing left to learn from (e.g. truncated before the answer)
      continue
    truncated += cut
    ids.append(example_ids)
    masks.append(mask)
  return Tokenized(ids, masks, truncated, dropped)


def pack(ids: list[np.ndarray], masks: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Rows [R, seq_len] of inputs/targets/segment_ids/positions/loss_mask, examples in
  order, a new row whenever the next example does not fit the current one."""
  rows = assign_rows([len(x) - 1 for x in ids], seq_len)  # predictions per example
  out = empty_rows(len(rows), seq_len)
  for r, members in enumerate(rows):
    pos = 0
    for seg, i in enumerate(members, 1):
      pos = place(out, r, pos, seg, ids[i], masks[i]).stop
  return out


def masked_unigram_loss(train: dict, val: dict, vocab_size: int) -> float:
  """Cross-entropy (nats) of val's masked targets under add-one-smoothed unigram
  frequencies of train's masked targets."""
  counts = np.bincount(train["targets"][train["loss_mask"] > 0], minlength=vocab_size)
  logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
  m = val["loss_mask"] > 0
  return float(-logp[val["targets"][m]].mean()) if m.any() else float("nan")


class ChatExamples(Reader):
  """Chat examples (data.paths), each rendered, masked to the assistant's tokens and
  packed; the last data.val_fraction of the examples held out."""

  reads = "chat examples"
  chat = True

  def texts(self, config):
    return (m["content"] for conv in conversations(config.data) for m in conv)

  def read(self, config, workdir, tokenizer) -> Corpus:
    d = config.data
    convs = conversations(d)
    cut = split(len(convs), d)
    train_t = tokenize_examples(convs[:cut], tokenizer, d)
    val_t = tokenize_examples(convs[cut:], tokenizer, d)
    print(f"chat examples: {len(train_t.ids):,} train, {len(val_t.ids):,} validation; "
          f"truncated {train_t.truncated + val_t.truncated:,}, dropped "
          f"{train_t.dropped + val_t.dropped:,} (over data.seq_len={d.seq_len} + 1 tokens, "
          f"data.chat.overlong={d.chat.overlong!r}, or nothing left to learn)", flush=True)
    if not train_t.ids or not val_t.ids:
      raise ValueError("no chat example is left in the train or the validation split "
                       "(see the counts above)")
    train = pack(train_t.ids, train_t.masks, d.seq_len)
    val = pack(val_t.ids, val_t.masks, d.seq_len)
    return Corpus(tokenizer, PackedExamples(train), PackedExamples(val),
                  masked_unigram_loss(train, val, config.model.vocab_size))


CHAT_EXAMPLES = ChatExamples()
