"""Train a model (or resume one):

  python -m llm.train --config=configs/tiny.py --workdir=DIR [--config.train.steps=200 ...]

Re-running the same command resumes from the latest checkpoint in DIR.
SIGTERM saves a checkpoint and exits cleanly. The loop is `llm.training.loop.train`.
"""

from __future__ import annotations

if __name__ == "__main__":  # first of all: a SIGTERM during start-up is a clean stop too
  from llm.training import preemption
  preemption.catch_sigterm()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llm import cli  # noqa: E402
from llm.parallel import distributed  # noqa: E402
from llm.training.loop import train  # noqa: E402

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(FLAGS.config.distributed)
  train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
