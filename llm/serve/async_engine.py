"""The engine on its own thread, for asyncio callers (the HTTP server, async code).

    engine = AsyncEngine(Engine.from_workdir("runs/tiny"))
    async for out in engine.generate("Romeo.", SamplingOptions(max_tokens=32)):
        print(out.outputs[0].text, end="")

A step takes tens of milliseconds to seconds, so it never runs on the event loop: one
thread owns the `Engine` and loops (apply queued adds and aborts, step, hand each
request's outputs to its asyncio queue). Callers only queue commands; a request is
checked (`Engine.check_prompt`) in the caller's thread first, so a bad one is refused
before it is queued. Leaving the `generate` iteration early (a client gone) aborts the
request and frees its pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import traceback

from llm.serve.engine import Engine, RequestOutput
from llm.serve.request import SamplingOptions


class EngineDead(RuntimeError):
  """The engine thread stopped on an error; the server answers 503 from then on."""


class AsyncEngine:
  """See the module docstring."""

  def __init__(self, engine: Engine):
    self.engine = engine
    self._commands: collections.deque = collections.deque()  # appends/pops are thread-safe
    self._wake = threading.Event()
    self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    self._ids = itertools.count()
    self._stop = False
    self.error: str | None = None  # the traceback that stopped the engine thread
    self._thread = threading.Thread(target=self._run, name="llm-serve-engine", daemon=True)
    self._thread.start()

  # ----------------------------------------------------------------- callers' side

  @property
  def in_flight(self) -> int:
    """Requests queued, waiting or running (streams not yet finished)."""
    return len(self._streams)

  @property
  def waiting(self) -> int:
    """Requests queued for the engine thread or waiting in its scheduler."""
    return len(self._commands) + len(self.engine.scheduler.waiting)

  async def generate(self, prompt, options: SamplingOptions | None = None,
                     request_id: str | None = None, adapter: str = ""):
    """Streams a request's outputs (RequestOutput, new tokens and text since the last),
    from the base model or the named LoRA adapter. Raises ValueError for a bad request
    before anything is queued."""
    if self.error is not None:
      raise EngineDead("the engine stopped on an error")
    options = options or SamplingOptions()
    ids = self.engine.check_prompt(prompt, options)
    self.engine.adapters.slot(adapter)
    rid = request_id or f"req-{next(self._ids)}"
    if rid in self._streams:
      raise ValueError(f"request id {rid!r} is already in use")
    queue: asyncio.Queue = asyncio.Queue()
    self._streams[rid] = (asyncio.get_running_loop(), queue)
    self._commands.append(("add", rid, ids, options, adapter))
    self._wake.set()
    finished = False
    try:
      while True:
        out = await queue.get()
        if isinstance(out, BaseException):
          raise out
        finished = out.finished
        yield out
        if finished:
          return
    finally:
      self._streams.pop(rid, None)
      if not finished:
        self._commands.append(("abort", rid))
        self._wake.set()

  def shutdown(self) -> None:
    """Stops the engine thread after its current step."""
    self._stop = True
    self._wake.set()
    self._thread.join(timeout=60)

  # ----------------------------------------------------------------- the engine thread

  def _deliver(self, rid: str, item) -> None:
    stream = self._streams.get(rid)
    if stream is not None:
      loop, queue = stream
      try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
      except RuntimeError:  # its event loop has closed
        pass

  def _apply_commands(self) -> None:
    while self._commands:
      command = self._commands.popleft()
      if command[0] == "add":
        _, rid, ids, options, adapter = command
        if rid not in self._streams:  # the caller left before it was added
          continue
        try:
          self.engine.add_request(ids, options, rid, adapter)
        except ValueError as e:
          self._deliver(rid, e)
      else:
        self.engine.abort(command[1])

  def _run(self) -> None:
    try:
      while not self._stop:
        self._apply_commands()
        if not self.engine.has_unfinished():
          self._wake.wait(timeout=0.5)
          self._wake.clear()
          continue
        outputs: list[RequestOutput] = self.engine.step()
        for out in outputs:
          self._deliver(out.request_id, out)
    except Exception as e:  # noqa: BLE001 - every waiting caller must hear of it
      self.error = traceback.format_exc()
      for rid in list(self._streams):
        self._deliver(rid, EngineDead(f"the engine stopped on an error: {e!r}"))
