"""Test setup: 8 fake CPU devices (set before jax is imported) and small shared fixtures."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT TPU compiles in several processes
# One persistent compilation cache per session (subprocesses inherit it): a resumed run, the
# same tiny model in another test, a launcher's workers reuse executables already compiled.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="llm-tests-jax-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  """One sentencepiece model for the tiny corpus, trained once per session."""
  from llm.data import sources, tokenizer
  cfg = tiny_config()
  out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  tokenizer.train_tokenizer(sources.documents(cfg.data), cfg.model.vocab_size, out)
  return str(out)


@pytest.fixture
def config(tokenizer_path):
  c = tiny_config()
  c.data.tokenizer_path = tokenizer_path
  return c


def pytest_sessionfinish(session):
  """An xdist worker whose tests are done may be interrupted by the controller as it shuts
  down; that SIGINT would land in whatever runs then (often jax's GC callback) and print a
  KeyboardInterrupt traceback attributed to nothing. Once the session is over it is moot."""
  import signal
  if hasattr(session.config, "workerinput"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
