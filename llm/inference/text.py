"""Text in, text out: load a workdir for inference and generate from string prompts.

    from llm.inference import load, generate
    config, params, tok = load("runs/tiny")
    print(generate(config, params, tok, ["ROMEO:", "JULIET:"], max_tokens=50))
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
  ids = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
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

  outs = decoder.generate(ids, max_tokens, sampling, seed, tokenizer.eos_id, on_token)
  texts = [tokenizer.decode(o) for o in outs]
  return texts[0] if isinstance(prompt, str) else texts
