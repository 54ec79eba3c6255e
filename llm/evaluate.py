"""Evaluate a workdir on its validation split, as its objective measures it: loss,
perplexity and bits per byte for next-token runs (pretrain, sft), accuracy and margins for
reward models (llm.objectives.heldout).

  python -m llm.evaluate --workdir=DIR [--max_batches=0 --batch_size=8]

writes DIR/eval.json.
"""

from __future__ import annotations

import json

from absl import flags

from llm import cli
from llm.config import check_range
from llm import objectives
from llm.inference import load
from llm.workdir import Workdir

FLAGS = flags.FLAGS


def main(argv):
  del argv
  check_range("--batch_size", FLAGS.batch_size, lo=1)
  check_range("--max_batches", FLAGS.max_batches, lo=0, note="0 = all")
  objectives.check_heldout(Workdir(FLAGS.workdir).read_config(), FLAGS.workdir)  # before loading
  config, params, tok = load(FLAGS.workdir)
  result = objectives.heldout(config, params, tok, FLAGS.workdir, FLAGS.batch_size,
                              FLAGS.max_batches)
  for k, v in result.items():
    print(f"{k:>14s}: {v:.4f}" if isinstance(v, float) else f"{k:>14s}: {v:,}")
  print(f"(over the first {result['rows']:,} of the {result['val_rows']:,} validation rows; "
        "training's eval_* read the first train.eval_batches x train.batch_size of them)")
  Workdir(FLAGS.workdir).eval_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training or converted workdir.")
  flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
  flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches; 0 for all.")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
