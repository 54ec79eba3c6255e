"""Train a model (or resume one):

  python -m llm.train --config=configs/tiny.py --workdir=DIR [--config.train.steps=200 ...]

Re-running the same command resumes from the latest checkpoint in DIR.
SIGTERM saves a checkpoint and exits cleanly. The loop is `llm.training.loop.train`.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from llm.parallel import distributed
from llm.training.loop import train

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  distributed.initialize(FLAGS.config.distributed)
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
