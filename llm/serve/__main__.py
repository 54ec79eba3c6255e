"""The OpenAI-compatible server:

  python -m llm.serve --workdir=runs/tiny [--port=8000 --api_key=KEY --max_num_seqs=16]
  python -m llm.serve --hf_dir=path/to/hf_model
  python -m llm.serve --workdir=runs/125m --speculative_method=draft --draft_workdir=runs/draft

It binds at once and answers /health with 503 while the model loads and every token
bucket compiles, then 200. SIGTERM (or Ctrl-C) drains: new requests get 503, in-flight
ones finish for up to --grace_seconds, then it exits 0. See llm/serve/server.py.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from absl import flags

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "A training workdir (pretrained, SFT, LoRA, MoE).")
  flags.DEFINE_string("hf_dir", None, "A Hugging Face model directory (converted in memory).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
  flags.DEFINE_integer("port", 8000, "Port to bind (0: any free one; see --port_file).")
  flags.DEFINE_string("port_file", "", "Once listening, write the bound port to this file.")
  flags.DEFINE_string("api_key", "", "When set, requests need 'Authorization: Bearer KEY'.")
  flags.DEFINE_string("served_model_name", "", "The model's name in the API (default: the "
                      "directory's name).")
  flags.DEFINE_integer("max_num_seqs", 64, "Sequences in one engine step.")
  flags.DEFINE_integer("max_num_batched_tokens", 512, "Tokens in one engine step.")
  flags.DEFINE_float("kv_cache_gib", 0.0, "KV cache size (0: half the memory the weights "
                     "leave).")
  flags.DEFINE_integer("max_model_len", 0, "Longest prompt + output (0: the model's "
                       "data.seq_len, or the HF max_position_embeddings).")
  flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
  flags.DEFINE_string("kv_cache_dtype", "auto", "auto (the model's) | int8 (a scale per token "
                      "and head).")
  flags.DEFINE_integer("max_queued", 256, "Requests waiting beyond this get 429.")
  flags.DEFINE_float("grace_seconds", 30.0, "On SIGTERM, how long in-flight requests may "
                     "take to finish.")
  flags.DEFINE_multi_string("lora", [], "NAME=WORKDIR: serve a LoRA adapter (repeatable).")
  flags.DEFINE_string("speculative_method", "", "Speculative decoding: ngram (prompt lookup) "
                      "or draft (a --draft_workdir model); empty: off.")
  flags.DEFINE_integer("num_speculative_tokens", 4, "Draft tokens verified per step.")
  flags.DEFINE_string("draft_workdir", "", "The draft model (same tokenizer) for "
                      "--speculative_method=draft.")
  flags.DEFINE_integer("prompt_lookup_max", 4, "ngram: the longest suffix looked up.")
  flags.DEFINE_integer("prompt_lookup_min", 2, "ngram: the shortest suffix looked up.")
  flags.DEFINE_string("log_level", "info", "debug | info | warning")


def check_flags() -> None:
  """Refuses bad flags before anything loads."""
  from llm.config import check_range
  if bool(FLAGS.workdir) == bool(FLAGS.hf_dir):
    raise ValueError("give exactly one of --workdir=DIR or --hf_dir=DIR")
  source = Path(FLAGS.workdir or FLAGS.hf_dir)
  if not source.is_dir():
    raise ValueError(f"--{'workdir' if FLAGS.workdir else 'hf_dir'}={str(source)!r} is not a "
                     "directory")
  check_range("--port", FLAGS.port, lo=0, hi=65535)
  for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "max_queued"):
    check_range(f"--{name}", getattr(FLAGS, name), lo=1)
  check_range("--kv_cache_gib", FLAGS.kv_cache_gib, lo=0)
  check_range("--grace_seconds", FLAGS.grace_seconds, lo=0)
  for spec in FLAGS.lora:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--lora={spec!r}: give NAME=WORKDIR")
    if not FLAGS.workdir:
      raise ValueError("--lora serves adapters over a --workdir base (LoRA runs name theirs)")
    if not Path(path).is_dir():
      raise ValueError(f"--lora={spec!r}: {path!r} is not a directory")
  speculative_config()
  from llm.serve.engine import KV_CACHE_DTYPES
  if FLAGS.kv_cache_dtype not in KV_CACHE_DTYPES:
    raise ValueError(f"--kv_cache_dtype={FLAGS.kv_cache_dtype!r}; allowed: "
                     f"{', '.join(KV_CACHE_DTYPES)}")
  if FLAGS.log_level not in ("debug", "info", "warning"):
    raise ValueError(f"--log_level={FLAGS.log_level!r}; allowed: debug, info, warning")


def speculative_config():
  """The --speculative_* flags as a SpeculativeConfig (None when off), or a ValueError."""
  if not FLAGS.speculative_method:
    if FLAGS.draft_workdir:
      raise ValueError("--draft_workdir needs --speculative_method=draft")
    return None
  from llm.serve.speculative import SpeculativeConfig
  return SpeculativeConfig(FLAGS.speculative_method, FLAGS.num_speculative_tokens,
                           FLAGS.draft_workdir, FLAGS.prompt_lookup_max, FLAGS.prompt_lookup_min)


def make_engine():
  from llm.serve.async_engine import AsyncEngine
  from llm.serve.engine import Engine
  kwargs = dict(max_num_seqs=FLAGS.max_num_seqs, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                kv_cache_gib=FLAGS.kv_cache_gib, page_size=FLAGS.page_size,
                speculative=speculative_config(), kv_cache_dtype=FLAGS.kv_cache_dtype)
  if FLAGS.max_model_len:
    kwargs["max_model_len"] = FLAGS.max_model_len
  t0 = time.monotonic()
  loras = dict(spec.partition("=")[::2] for spec in FLAGS.lora)
  engine = (Engine.from_workdir(FLAGS.workdir, loras=loras, **kwargs) if FLAGS.workdir
            else Engine.from_hf(FLAGS.hf_dir, **kwargs))
  logging.getLogger("llm.serve").info(
      "engine built in %.1f s (compile seconds per token bucket: %s)", time.monotonic() - t0,
      {b: round(s, 1) for b, s in engine.runner.compile_seconds.items()})
  return AsyncEngine(engine)


def serve(state, make, host: str, port: int, grace_seconds: float, log_level: str = "info",
          port_file: str = ""):
  """Runs the app until SIGTERM / SIGINT, then drains (see the module docstring)."""
  import uvicorn

  from llm.serve.server import build_app, load_in_background

  class DrainingServer(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets)
      if port_file and self.servers:
        bound = self.servers[0].sockets[0].getsockname()[1]
        Path(port_file).write_text(f"{bound}\n")

    def handle_exit(self, sig, frame):
      if state.draining:  # a second signal: stop now
        return super().handle_exit(sig, frame)
      state.draining = True
      logging.getLogger("llm.serve").info("draining: %d request(s) in flight, up to %.0f s",
                                          state.engine.in_flight if state.engine else 0,
                                          grace_seconds)

      def wait():
        deadline = time.monotonic() + grace_seconds
        while (state.engine is not None and state.engine.in_flight
               and time.monotonic() < deadline):
          time.sleep(0.05)
        self.should_exit = True

      threading.Thread(target=wait, daemon=True).start()

  app_ = build_app(state)
  config = uvicorn.Config(app_, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=max(int(grace_seconds), 1))
  server = DrainingServer(config)
  load_in_background(state, make)
  server.run()
  if state.engine is not None:
    state.engine.shutdown()


def main(argv):
  del argv
  check_flags()
  # our own handler: absl owns the root logger (at WARNING, see llm.cli)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
  serve_log = logging.getLogger("llm.serve")
  serve_log.handlers[:] = [handler]
  serve_log.setLevel(FLAGS.log_level.upper())
  serve_log.propagate = False
  from llm.serve.server import ServerState
  source = Path(FLAGS.workdir or FLAGS.hf_dir).resolve()
  state = ServerState(model_name=FLAGS.served_model_name or source.name, api_key=FLAGS.api_key,
                      max_queued=FLAGS.max_queued)
  serve(state, make_engine, FLAGS.host, FLAGS.port, FLAGS.grace_seconds, FLAGS.log_level,
        FLAGS.port_file)


if __name__ == "__main__":
  _define_flags()
  from llm.cli import run
  run(main)
