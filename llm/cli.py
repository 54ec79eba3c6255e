"""Running a command-line entry point: a user error (a bad value, a missing file, a run
that cannot go on) prints one line saying what is wrong and exits 1; `--verbosity=1`
shows the full traceback instead.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

# What a user's input or environment can cause; anything else is a bug and keeps its
# traceback (ImportError: an optional extra that is not installed).
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError, ImportError)
HELP_FLAGS = {"--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}


def message(err: BaseException) -> str:
  text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
  return f"{type(err).__name__}: {text}" if not isinstance(err, ValueError) else str(text)


def run(main, flags_parser=None) -> None:
  """app.run(main) with user errors turned into one line on stderr and exit status 1.
  `flags_parser` as in app.run (e.g. one that leaves unknown flags to Beam)."""

  started = []

  def guarded(argv):
    started.append(True)
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
      return main(argv)
    except USER_ERRORS as err:
      if flags.FLAGS.verbosity >= 1:
        raise
      print(f"error: {message(err)} [--verbosity=1 shows the traceback]", file=sys.stderr)
      sys.exit(1)

  try:
    app.run(guarded, **({'flags_parser': flags_parser} if flags_parser else {}))
  except SystemExit as exit_:
    # absl exits 1 after printing the help it was asked for: that is a success
    if not started and exit_.code == 1 and HELP_FLAGS & set(sys.argv[1:]):
      sys.exit(0)
    raise
  except SyntaxError as err:
    if started or "--verbosity=1" in sys.argv:
      raise
    print(f"error: the config file {err.filename} has a syntax error at line {err.lineno}: "
          f"{err.msg}", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, ValueError, TypeError, NameError, ImportError) as err:
    if started or "--verbosity=1" in sys.argv:
      raise
    # Raised while parsing flags: a --config.* override naming a field that does not exist
    # or giving a value of the wrong type.
    name = str(err.args[0] if err.args else err).strip("'\"")
    culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and name in a]
    what = (f"the config has no field {name!r}" if isinstance(err, (AttributeError, KeyError))
            else message(err))
    if isinstance(err, (NameError, ImportError)):  # the config file's own code failed
      files = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")]
      print(f"error: the config file {' '.join(files) or ''} failed to load: "
            f"{type(err).__name__}: {err}", file=sys.stderr)
      sys.exit(1)
    print(f"error: cannot apply {' '.join(culprits) or 'the command-line flags'}: {what}",
          file=sys.stderr)
    sys.exit(1)
