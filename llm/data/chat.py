"""Chat data: examples in the formats people have -> messages -> template -> tokens + mask.

Formats (`to_messages`, one JSON object per example):
  - OpenAI `messages`: [{"role": "system"|"user"|"assistant", "content": ...}, ...];
    ShareGPT `conversations`: [{"from": "system"|"human"|"gpt", "value": ...}, ...];
  - Alpaca: `instruction`, optional `input` (appended after a blank line), `output`;
  - `prompt` / `completion`: strings (one user and one assistant turn) or lists of
    messages (TRL's conversational form).

Templates are Hugging Face Jinja chat templates rendered as transformers renders them
(sandboxed Jinja2 with trim_blocks and lstrip_blocks, `raise_exception`, `tojson`,
`strftime_now`, the tokenizer's special tokens as variables, `{% generation %}` blocks
tracked). A tokenizer.json's own `chat_template` is used when `data.chat.template` is
empty; built-ins: TEMPLATES.

The loss mask (`data.chat.loss_on`, LOSS_ON) covers the assistant content and its
end-of-turn token: from the template's `{% generation %}` blocks when it has them (the
built-ins do; transformers' `return_assistant_tokens_mask` reads the same blocks),
otherwise by rendering the conversation up to each assistant turn with and without it
and locating the content in the difference. Token ids are the rendered text tokenized
with special-token strings as their ids, as `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

MISTRAL = (  # [INST] ... [/INST] answer</s>; a system message opens the first user turn
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('Mistral turns are user or assistant, got ' + message['role']) }}"
    "{% endif %}{% endfor %}")

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}
# data.chat.template -> a built-in template; "" = the tokenizer's own chat_template
TEMPLATE_CHOICES = {"": None, **TEMPLATES}
# the single-token strings each built-in needs (added to a sentencepiece vocabulary
# trained from scratch as user-defined symbols)
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
}
# special tokens that end an assistant turn in common templates (generation stops there)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_ids(tokenizer) -> list[int]:
  """EOS and whichever end-of-turn tokens the tokenizer has."""
  specials = tokenizer.special_tokens
  ids = [specials[s] for s in END_OF_TURN if s in specials]
  return ([] if tokenizer.eos_id is None else [tokenizer.eos_id]) + ids


# data.chat.loss_on -> which tokens the loss sees
LOSS_ON = ("assistant", "last", "all")  # every assistant turn | the last one | everything
# data.chat.overlong -> what happens to an example longer than data.seq_len + 1 tokens
OVERLONG = ("truncate", "drop")

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}


# ----------------------------------------------------------------------------- formats

def _check_messages(messages, where: str) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: messages must be a non-empty list of "
                     "{'role': ..., 'content': ...} objects")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', "
                       f"got {json.dumps(m)[:80]}")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: message {i} has role {m['role']!r}; allowed: {list(ROLES)}")
    if not isinstance(m["content"], str):
      raise ValueError(f"{where}: message {i} content must be a string, got "
                       f"{json.dumps(m['content'])[:80]}")
    if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool)
                          or m["role"] != "assistant"):
      raise ValueError(f"{where}: message {i} has 'weight': {json.dumps(m['weight'])}; "
                       "OpenAI's format allows 'weight' 0 (not trained on) or 1 on assistant "
                       "messages only")
  return [{k: v for k, v in m.items() if v is not None} for m in messages]


def to_messages(record: dict, where: str = "example") -> list[dict]:
  """The conversation of one example in any supported format (see the module docstring)."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: an example must be a JSON object, got {json.dumps(record)[:80]}")
  if "messages" in record:
    return _check_messages(record["messages"], where)
  if "conversations" in record:
    turns = record["conversations"]
    if not isinstance(turns, list):
      raise ValueError(f"{where}: 'conversations' must be a list")
    out = []
    for i, t in enumerate(turns):
      role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
      if role is None:
        raise ValueError(f"{where}: conversation turn {i} needs 'from' in "
                         f"{sorted(SHAREGPT_ROLES)} and 'value', got {json.dumps(t)[:80]}")
      out.append({"role": role, "content": t.get("value")})
    return _check_messages(out, where)
  if "instruction" in record and "output" in record:
    user = record["instruction"]
    if record.get("input"):
      user = f"{user}\n\n{record['input']}"
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return _check_messages(system + [{"role": "user", "content": user},
                                     {"role": "assistant", "content": record["output"]}], where)
  if "prompt" in record and "completion" in record:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
      return _check_messages([{"role": "user", "content": prompt},
                              {"role": "assistant", "content": completion}], where)
    return _check_messages(list(prompt) + list(completion), where)
  raise ValueError(f"{where}: keys {sorted(record)} match no chat format; expected 'messages', "
                   "'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or "
                   "'prompt'+'completion'")


# ----------------------------------------------------------------------------- templates

@lru_cache(maxsize=16)
def _compile(template: str):
  import jinja2
  from jinja2.ext import Extension, loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationTracker(Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span it renders."""
    tags = {"generation"}

    def __init__(self, environment):
      super().__init__(environment)
      environment.extend(track_generation=self.track)
      self._spans = None
      self._blocks = None

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller):
      text = caller()
      if self._spans is not None:
        start = len("".join(self._blocks))
        self._spans.append((start, start + len(text)))
      return text

    @contextmanager
    def track(self, blocks: list, spans: list):
      self._blocks, self._spans = blocks, spans
      try:
        yield
      finally:
        self._blocks = self._spans = None

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationTracker, loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env, env.from_string(template)


def special_token_vars(tokenizer) -> dict[str, str]:
  """bos_token, eos_token (and what else the tokenizer names) as template variables."""
  out = {}
  for name in ("bos", "eos"):
    s = tokenizer.token_string(getattr(tokenizer, f"{name}_id"))
    if s is not None:
      out[f"{name}_token"] = s
  config = getattr(tokenizer, "config", {})
  for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    if isinstance(value, str):
      out[key] = value
  return out


def render(template: str, messages: list[dict], variables: dict,
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
  """(text, character spans of its {% generation %} blocks)."""
  import jinja2
  env, compiled = _compile(template)
  blocks: list[str] = []
  spans: list[tuple[int, int]] = []
  try:
    with env.track_generation(blocks, spans):
      for block in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **variables):
        blocks.append(block)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"chat template failed on this conversation: {e}") from None
  return "".join(blocks), spans


def template_for(chat_cfg, tokenizer) -> str:
  """data.chat.template's built-in, else the tokenizer's own chat_template."""
  if chat_cfg.template:
    return TEMPLATES[chat_cfg.template]
  own = getattr(tokenizer, "chat_template", None)
  if not own:
    raise ValueError(f"the tokenizer {str(tokenizer.path)!r} has no chat_template; set "
                     f"data.chat.template to one of {sorted(TEMPLATES)}")
  return own


def _assistant_spans_in_render(messages: list[dict], text: str,
                               tokenizer) -> list[tuple[int, int]]:
  """For templates without {% generation %}: each assistant turn's content (and the
  end-of-turn special token right after it, as a {% generation %} block around content and
  end token would mark it) located in the one full rendering, left to right: the
  message before each turn is found first, so text it repeats cannot be taken for the
  turn. Templates that move or merge other messages (Mistral's system message inside the
  last user turn, Gemma's inside the first) or close turns differently (Phi-3's EOS at
  the end) render their assistant turns in order, so this locates them all."""
  specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
  spans, cursor = [], 0
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    previous = messages[i - 1]["content"].strip() if i else ""
    if previous and messages[i - 1]["role"] != "assistant":
      found = text.find(previous, cursor)
      if found >= 0:
        cursor = found + len(previous)
    content = m["content"]
    start = text.find(content, cursor)
    if start < 0:
      content = content.strip()
      start = text.find(content, cursor)
    if start < 0:
      raise ValueError(f"assistant message {i} does not appear verbatim in the rendered "
                       "conversation; add {% generation %} blocks to the template")
    end = start + len(content)
    eot = next((s for s in specials if text.startswith(s, end)), None)
    spans.append((start, end + (len(eot) if eot else 0)))
    cursor = spans[-1][1]
  return spans


def render_ids(tokenizer, template: str, messages: list[dict], variables: dict,
               add_generation_prompt: bool = False) -> np.ndarray:
  """The token ids (int32) of a conversation rendered with `template`."""
  text, _ = render(template, messages, variables, add_generation_prompt)
  return np.asarray(tokenizer.encode_with_offsets(text)[0], np.int32)


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
  """How many leading token ids two sequences share (where a completion starts after its
  tokenized prompt, as TRL 1.16 counts it)."""
  n = min(len(a), len(b))
  differ = np.flatnonzero(a[:n] != b[:n])
  return int(differ[0]) if len(differ) else n


def tokenize_chat(tokenizer, template: str, messages: list[dict],
                  loss_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
  """(token ids int32, loss mask bool per token) of one conversation."""
  variables = special_token_vars(tokenizer)
  text, spans = render(template, messages, variables)
  if not spans and loss_on != "all":
    spans = _assistant_spans_in_render(messages, text, tokenizer)
  weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
  if loss_on != "all" and 0 in weights:  # OpenAI's "weight": 0 turns are not trained on
    if len(weights) != len(spans):
      raise ValueError(f"the chat template marks {len(spans)} assistant span(s) for "
                       f"{len(weights)} assistant messages, so their 'weight's cannot be "
                       "applied")
    spans = [s for s, w in zip(spans, weights) if w] if loss_on == "assistant" else (
        spans[-1:] if weights[-1] else [])
  elif loss_on == "last":
    spans = spans[-1:]
  ids, offsets = tokenizer.encode_with_offsets(text)
  mask = np.zeros(len(ids), bool)
  if loss_on == "all":
    mask[:] = True
  else:
    starts = np.array([o[0] for o in offsets], np.int64)
    ends = np.array([o[1] for o in offsets], np.int64)
    for s, e in spans:
      mask |= (starts < e) & (ends > s)
  return np.asarray(ids, np.int32), mask
