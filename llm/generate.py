"""Generate text from a trained (or converted) workdir with a KV cache.

  python -m llm.generate --workdir=DIR --prompt="Romeo." [--max_tokens=200 --temperature=0.8
      --top_k=40 --top_p=0.95 --min_p=0.05 --repetition_penalty=1.1 --seed=0]
  python -m llm.generate --workdir=DIR --chat --prompt="Reverse the letters: abc"

With --chat the prompt is a user message rendered with the run's chat template (and
--system, if given); the reply stops at EOS or the template's end of turn.

Loads DIR/config.json, the newest checkpoint's params and DIR's tokenizer, and streams
text to the console. From Python, use `llm.inference` (load, generate, Decoder).
"""

from __future__ import annotations

import sys

from absl import flags

from llm import cli
from llm.config import check_range
from llm.inference import SamplingParams, chat, generate, load

FLAGS = flags.FLAGS


def main(argv):
  del argv
  sampling = SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                            top_p=FLAGS.top_p, min_p=FLAGS.min_p,
                            repetition_penalty=FLAGS.repetition_penalty)
  check_range("--max_tokens", FLAGS.max_tokens, lo=1)
  check_range("--seed", FLAGS.seed, lo=0)
  if FLAGS.system and not FLAGS.chat:
    raise ValueError("--system is a system message of the chat template: add --chat (without "
                     "it --prompt is plain text to continue)")
  config, params, tokenizer = load(FLAGS.workdir)
  if FLAGS.chat:
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    chat(config, params, tokenizer, [system + [{"role": "user", "content": FLAGS.prompt}]],
         FLAGS.max_tokens, sampling, FLAGS.seed, stream=sys.stdout)
    sys.stdout.write("\n")
    return
  sys.stdout.write(FLAGS.prompt)
  generate(config, params, tokenizer, FLAGS.prompt, FLAGS.max_tokens, sampling, FLAGS.seed,
           stream=sys.stdout)
  sys.stdout.write("\n")


def define_flags():
  flags.DEFINE_string("workdir", None, "A training workdir.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_tokens", 200, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Sample among the k likeliest tokens; 0 for all.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: smallest set with this much mass; 1 is off.")
  flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability; 0 is off.")
  flags.DEFINE_float("repetition_penalty", 1.0, "Penalise tokens already seen; 1 is off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("chat", False, "Treat --prompt as a user message in the chat template.")
  flags.DEFINE_string("system", "", "With --chat: a system message.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
