"""Prompts for GRPO: JSONL -> conversations to complete, with the fields rewards check.

Formats: TRL's prompt-only records, `prompt` (a string or a list of messages) plus any
other fields (e.g. `answer`), which reach the reward functions by name
(llm.training.rewards); or a chat example in any format llm.data.chat reads that ends
with an assistant message: the conversation before it is the prompt and the message's
content its `answer` (so a task's SFT data serve as GRPO prompts with verifiable answers).

Each prompt is rendered with the run's chat template and a generation prompt; prompts
whose tokens plus train.grpo.max_new_tokens exceed data.seq_len + 1 are dropped and counted.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from llm.data import chat
from llm.data.pipeline import Corpus, Reader
from llm.data.packing import split
from llm.data.sources import records


@dataclasses.dataclass
class Prompt:
  messages: list[dict]  # the conversation so far, ending before the assistant's reply
  columns: dict  # the record's other fields, by name (answer, ...)
  ids: np.ndarray | None = None  # rendered with a generation prompt, int32
  where: str = ""  # file:line of the record


def to_prompt(record, where: str = "example") -> Prompt:
  if not isinstance(record, dict):
    raise ValueError(f"{where}: a prompt record must be a JSON object, got "
                     f"{json.dumps(record)[:80]}")
  if "prompt" in record and "completion" not in record:  # TRL's prompt-only format
    value = record["prompt"]
    if isinstance(value, str):
      messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
      messages = chat.to_messages({"messages": value}, where)
    else:
      raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got "
                       f"{json.dumps(value)[:80]}")
    columns = {k: v for k, v in record.items() if k != "prompt"}
  else:
    conv = chat.to_messages(record, where)
    columns = {k: v for k, v in record.items()
               if k not in ("messages", "conversations", "instruction", "input", "output",
                            "prompt", "completion", "system")}
    if conv[-1]["role"] == "assistant":
      columns.setdefault("answer", conv[-1]["content"])
      conv = conv[:-1]
    messages = conv
  if not messages or messages[-1]["role"] == "assistant":
    raise ValueError(f"{where}: a prompt must end with a user (or system/tool) message for the "
                     "model to answer")
  return Prompt(messages, columns, where=where)


def read_prompts(data_cfg) -> list[Prompt]:
  out = [to_prompt(record, where) for where, record in records(data_cfg)]
  if not out:
    raise ValueError(f"data.paths={data_cfg.paths!r} holds no prompts")
  return out


class PromptSet:
  """Tokenized prompts; as a grain source it yields {"index": i} (the rollout reads
  `prompts[i]`), so the iterator's checkpointed state is the position in the prompts."""

  def __init__(self, prompts: list[Prompt]):
    self.prompts = prompts

  def __len__(self) -> int:
    return len(self.prompts)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"prompt {index} out of range [0, {len(self)})")
    return {"index": np.int32(index)}

  def __repr__(self) -> str:
    return f"PromptSet(prompts={len(self)})"


def tokenize_prompts(prompts: list[Prompt], tokenizer, data_cfg,
                     max_new_tokens: int) -> tuple[list[Prompt], int]:
  """(prompts with ids, how many were dropped for length)."""
  template = chat.template_for(data_cfg.chat, tokenizer)
  variables = chat.special_token_vars(tokenizer)
  kept, dropped = [], 0
  for p in prompts:
    ids = chat.render_ids(tokenizer, template, p.messages, variables,
                          add_generation_prompt=True)
    if len(ids) == 0 or len(ids) + max_new_tokens > data_cfg.seq_len + 1:
      dropped += 1
      continue
    kept.append(dataclasses.replace(p, ids=ids))
  return kept, dropped


class Prompts(Reader):
  """Prompts (data.paths) rendered with a generation prompt; the last data.val_fraction
  held out. The rows are prompt indices (PromptSet): the run completes them itself."""

  reads = "prompts"
  chat = True

  def texts(self, config):
    return (m["content"] for p in read_prompts(config.data) for m in p.messages)

  def read(self, config, workdir, tokenizer) -> Corpus:
    d, g = config.data, config.train.grpo
    prompts = read_prompts(d)
    cut = split(len(prompts), d, "prompt(s)")
    train, dropped_train = tokenize_prompts(prompts[:cut], tokenizer, d, g.max_new_tokens)
    val, dropped_val = tokenize_prompts(prompts[cut:], tokenizer, d, g.max_new_tokens)
    print(f"prompts: {len(train):,} train, {len(val):,} validation; dropped "
          f"{dropped_train + dropped_val:,} (prompt + train.grpo.max_new_tokens="
          f"{g.max_new_tokens} over data.seq_len={d.seq_len} + 1 tokens)", flush=True)
    if not train or not val:
      raise ValueError("no prompt is left in the train or the validation split (see the "
                       "counts above): raise data.seq_len or lower train.grpo.max_new_tokens")
    return Corpus(tokenizer, PromptSet(train), PromptSet(val), float("nan"))


PROMPTS = Prompts()
