"""Text in, text out: load a workdir for inference and generate from string prompts.

    from llm.inference import load, generate
    config, params, tok = load("runs/tiny")
    print(generate(config, params, tok, ["Romeo.", "Juliet."], max_tokens=50))
    print(chat(config, params, tok, [[{"role": "user", "content": "Reverse: abc"}]]))

`chat` renders conversations with the run's chat template (data.chat.template, else the
tokenizer's) and a generation prompt, and returns the assistant's replies.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llm.inference.decoder import Decoder
from llm.inference.sampling import SamplingParams
from llm.workdir import load_params, load_tokenizer


def load(workdir: str | Path):
  """(config, params, tokenizer) of the newest checkpoint in `workdir` (params only;
  see llm.workdir.load_params)."""
  config, params = load_params(workdir)
  return config, params, load_tokenizer(workdir, config)


def generate(config, params, tokenizer, prompt: str | list[str], max_tokens: int = 200,
             sampling: SamplingParams = SamplingParams(), seed: int = 0, stream=None):
  """Text continuation(s) of `prompt` (a string or a list of strings); stops at EOS.
  With `stream` (a file), a single prompt's text is written as it is generated."""
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  ids = [tokenizer.bos_prefix() + list(tokenizer.encode(p)) for p in prompts]
  texts = generate_ids(config, params, tokenizer, ids, max_tokens, sampling, seed, stream)
  return texts[0] if isinstance(prompt, str) else texts


def chat(config, params, tokenizer, conversations: list[list[dict]], max_tokens: int = 200,
         sampling: SamplingParams = SamplingParams(), seed: int = 0, stream=None) -> list[str]:
  """The assistant's reply to each conversation (a list of {"role", "content"} messages)."""
  from llm.data import chat as chat_lib
  template = chat_lib.template_for(config.data.chat, tokenizer)
  variables = chat_lib.special_token_vars(tokenizer)
  ids = []
  for messages in conversations:
    text, _ = chat_lib.render(template, messages, variables, add_generation_prompt=True)
    ids.append(tokenizer.encode_with_offsets(text)[0])
  return generate_ids(config, params, tokenizer, ids, max_tokens, sampling, seed, stream,
                      stop=chat_lib.stop_ids(tokenizer))


def generate_ids(config, params, tokenizer, ids: list[list[int]], max_tokens: int = 200,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0,
                 stream=None, stop: list[int] | None = None) -> list[str]:
  """Decoded continuations of token-id prompts; stops at EOS (or any of `stop`)."""
  prompts = ids
  longest = max(len(i) for i in ids)
  if longest + max_tokens > config.data.seq_len:
    print(f"warning: prompt ({longest} tokens) + max_tokens ({max_tokens}) runs past the "
          f"{config.data.seq_len} tokens the model was trained on (data.seq_len); text beyond "
          "that is usually degraded", file=sys.stderr, flush=True)
  decoder = Decoder(config.model, params)
  printed = [""]
  collected: list[int] = []

  def on_token(step, tokens_B, done_B):
    del step
    if stream is None or len(prompts) != 1 or done_B[0]:
      return
    collected.append(int(tokens_B[0]))
    text = tokenizer.decode(collected)
    stream.write(text[len(printed[0]):])
    stream.flush()
    printed[0] = text

  outs = decoder.generate(ids, max_tokens, sampling, seed,
                          tokenizer.eos_id if stop is None else stop, on_token)
  return [tokenizer.decode(o) for o in outs]
