"""The OpenAI-compatible HTTP server on the engine: FastAPI routes, streaming (server-sent
events), API key, errors in OpenAI's shape, Prometheus metrics, access log, readiness and
draining. `python -m llm.serve` (llm/serve/__main__.py) builds and runs it.

    GET  /health               200 when ready; 503 while loading or draining
    GET  /v1/models
    POST /v1/completions       prompt: str | [str] | [int] | [[int]]
    POST /v1/chat/completions  messages rendered with the model's chat template
    GET  /metrics              Prometheus

Every request is checked before it is queued, so a bad one gets a 400 naming the field,
not a broken stream. A client that disconnects mid-stream aborts its request (its pages
are freed at the next step). No input gets a 500: anything unforeseen is answered as a
400 if the request caused it, else 503 (the engine stopped), and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llm.serve import protocol
from llm.serve import tools as tools_lib
from llm.serve.async_engine import AsyncEngine, EngineDead
from llm.serve.protocol import APIError

access_log = logging.getLogger("llm.serve.access")
log = logging.getLogger("llm.serve")


@dataclass
class ServerState:
  """What the routes share. `engine` is None until loading finishes."""
  model_name: str
  api_key: str = ""
  max_queued: int = 256
  engine: AsyncEngine | None = None
  chat_template: str | None = None
  draining: bool = False
  load_error: str | None = None
  created: int = field(default_factory=lambda: int(time.time()))
  metrics: Any = None  # ServerMetrics, set by build_app

  @property
  def ready(self) -> bool:
    return self.engine is not None and self.engine.error is None and not self.draining


def load_in_background(state: ServerState, make_engine: Callable[[], AsyncEngine]) -> threading.Thread:
  """Builds the engine (load, compile every bucket) on a thread; /health says 503 till
  then."""

  def run():
    try:
      engine = make_engine()
      state.chat_template = getattr(engine.engine, "chat_template", None)
      state.engine = engine
      log.info("ready: %s", state.model_name)
    except Exception as e:  # noqa: BLE001 - reported by /health and the log
      state.load_error = f"{type(e).__name__}: {e}"
      log.exception("loading the model failed")

  thread = threading.Thread(target=run, name="llm-serve-load", daemon=True)
  thread.start()
  return thread


# ----------------------------------------------------------------------------- helpers

def _error_response(e: APIError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


def _token_text(tokenizer, token_id: int) -> str:
  piece = tokenizer.token_string(token_id)
  if piece is not None and "\u2581" in piece:  # sentencepiece: its word-start marker
    return piece.replace("\u2581", " ")
  return tokenizer.decode([token_id])


class _Choice:
  """One generated choice as it accumulates (text, ids, logprobs, finish reason)."""

  def __init__(self, index: int):
    self.index = index
    self.text, self.token_ids, self.logprobs = "", [], []
    self.finish_reason: str | None = None
    self.stop_reason: int | str | None = None  # the stop string or token id (vLLM's field)


def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
  """(stream index, item) from several async iterators as they come."""
  queue: asyncio.Queue = asyncio.Queue()
  done = object()

  async def pump(i, it):
    try:
      async for item in it:
        await queue.put((i, item))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      await queue.put((i, e))
    finally:
      await queue.put((i, done))

  async def merged():
    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    remaining = len(tasks)
    try:
      while remaining:
        i, item = await queue.get()
        if item is done:
          remaining -= 1
          continue
        if isinstance(item, BaseException):
          raise item
        yield i, item
    finally:
      for t in tasks:
        t.cancel()
      for it in streams:
        await it.aclose()

  return merged()


# ----------------------------------------------------------------------------- the app

def build_app(state: ServerState) -> FastAPI:
  from llm.serve.metrics import ServerMetrics

  def engine_metrics():
    return state.engine.engine.metrics() if state.engine is not None else None

  state.metrics = ServerMetrics(engine_metrics)
  app = FastAPI(title="llm.serve", description="OpenAI-compatible API on the llm serving "
                "engine", responses=protocol.ERROR_RESPONSES)

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError):
    return _error_response(e)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request: Request, e: RequestValidationError):
    message, param = protocol.field_error_message(e.errors())
    return _error_response(APIError(400, message, param))

  @app.exception_handler(404)
  async def _not_found(request: Request, e):
    return _error_response(APIError(404, f"no route {request.method} {request.url.path}"))

  @app.exception_handler(405)
  async def _bad_method(request: Request, e):
    return _error_response(APIError(405, f"{request.method} is not allowed on "
                                         f"{request.url.path}", type_="invalid_request_error"))

  @app.exception_handler(Exception)
  async def _unforeseen(request: Request, e: Exception):
    log.exception("unforeseen error on %s", request.url.path)
    return _error_response(APIError(503, f"the server could not handle this request: "
                                         f"{type(e).__name__}"))

  @app.middleware("http")
  async def _count(request: Request, call_next):
    response = await call_next(request)
    path = request.url.path
    if path.startswith("/v1/"):
      state.metrics.requests.labels(path, str(response.status_code)).inc()
    return response

  def _check_auth(request: Request) -> None:
    if state.api_key and request.headers.get("authorization", "") != f"Bearer {state.api_key}":
      raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                     code="invalid_api_key")

  def _check_ready() -> AsyncEngine:
    if state.draining:
      raise APIError(503, "the server is shutting down")
    if state.engine is None:
      raise APIError(503, "the model is still loading" if state.load_error is None else
                     f"the model failed to load: {state.load_error}")
    if state.engine.error is not None:
      raise APIError(503, "the engine stopped on an error; restart the server")
    return state.engine

  def _check_model(name: str) -> str:
    """The adapter a model name selects ("" for the base)."""
    adapters = [] if state.engine is None else sorted(
        n for n in state.engine.engine.adapters.slots if n)
    if name == state.model_name:
      return ""
    if name in adapters:
      return name
    raise APIError(404, f"model {name!r} does not exist; served: "
                        f"{[state.model_name] + adapters}", "model", code="model_not_found")

  def _admit(request: Request, body) -> tuple[AsyncEngine, str]:
    """(the engine, the adapter the body's model names) of a generation request that may
    go on: key, readiness, model and unsupported fields checked, in that order."""
    _check_auth(request)
    engine = _check_ready()
    adapter = _check_model(body.model)
    protocol.check_unsupported(body)
    return engine, adapter

  def _check_queue(engine: AsyncEngine, n: int) -> None:
    if engine.waiting + n > state.max_queued:
      raise APIError(429, f"the queue is full ({engine.waiting} waiting, max_queued="
                          f"{state.max_queued}); retry later")

  @app.get("/health")
  async def health():
    if state.ready:
      return {"status": "ok"}
    return _error_response(APIError(503, "draining" if state.draining else (
        "loading" if state.load_error is None else f"failed to load: {state.load_error}")))

  @app.get("/v1/models")
  async def models(request: Request):
    _check_auth(request)
    max_len = state.engine.engine.max_model_len if state.engine is not None else None
    cards = [protocol.ModelCard(id=state.model_name, created=state.created,
                                root=state.model_name, max_model_len=max_len)]
    if state.engine is not None:
      cards += [protocol.ModelCard(id=name, created=state.created, root=name,
                                   parent=state.model_name, max_model_len=max_len)
                for name in sorted(state.engine.engine.adapters.slots) if name]
    return {"object": "list", "data": [c.model_dump() for c in cards]}

  @app.get("/metrics")
  async def metrics():
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

  @app.post("/v1/completions")
  async def completions(body: protocol.CompletionRequest, request: Request):
    engine, adapter = _admit(request, body)
    prompts = _completion_prompts(body.prompt)
    if body.echo and body.logprobs is not None:
      raise APIError(400, "echo with logprobs would need the prompt's log-probabilities, "
                          "which this server does not compute; drop one of them", "echo")
    options = protocol.sampling_options(body, 16 if body.max_tokens is None else body.max_tokens,
                                        body.logprobs)
    return await _run(request, engine, body, "text_completion", prompts, options,
                      echo=body.echo, adapter=adapter)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
    engine, adapter = _admit(request, body)
    functions, tool_choice = tools_lib.check_tools(body.tools, body.tool_choice)
    grammar = protocol.response_format_grammar(body.response_format)
    forced = tools_lib.forced_grammar(functions, tool_choice)
    if grammar and forced:
      raise APIError(400, "response_format and a forced tool_choice both constrain the "
                          "output: give one", "response_format")
    prompt = _render_chat(engine, state.chat_template, body)
    top = body.top_logprobs
    if top is not None and not body.logprobs:
      raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else (
        body.max_tokens)
    if max_tokens is None:  # as much as the context leaves
      max_tokens = max(engine.engine.max_model_len - len(prompt), 1)
    options = protocol.sampling_options(body, max_tokens, (top or 0) if body.logprobs else None,
                                        grammar or forced)
    tool_mode = None if tool_choice == "none" else (functions, tool_choice)
    return await _run(request, engine, body, "chat.completion", [prompt], options,
                      tool_mode=tool_mode, adapter=adapter)

  def _completion_prompts(prompt) -> list:
    if isinstance(prompt, str):
      return [prompt]
    if not prompt:
      raise APIError(400, "prompt: must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
      return [list(prompt)]
    if any(isinstance(p, list) and not p for p in prompt):
      raise APIError(400, "prompt: a token-id prompt must not be empty", "prompt")
    return list(prompt)

  async def _run(request: Request, engine: AsyncEngine, body, kind: str, prompts: list,
                 options, echo: bool = False, tool_mode=None, adapter: str = ""):
    """Checks every prompt, queues them, and answers whole or as a stream. With
    `tool_mode` ((functions, tool_choice), chat only) each choice's text becomes tool calls
    where it holds them; a stream then sends each choice whole at its end."""
    _check_queue(engine, len(prompts))
    try:
      ids = [engine.engine.check_prompt(p, options) for p in prompts]
    except ValueError as e:
      param = "max_tokens" if "max_tokens" in str(e) else (
          "response_format" if "JSON schema" in str(e) else
          "messages" if kind == "chat.completion" else "prompt")
      raise APIError(400, str(e), param) from None
    rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    started = time.monotonic()
    streams = [engine.generate(p, options, f"{rid}-{i}", adapter) for i, p in enumerate(ids)]
    n = options.n
    choices = [_Choice(i) for i in range(len(prompts) * n)]
    tokenizer = engine.engine.tokenizer
    if echo:
      for i, p in enumerate(prompts):
        text = p if isinstance(p, str) else (tokenizer.decode(p) if tokenizer else "")
        for j in range(n):
          choices[i * n + j].text = text
    timing = {"first": None, "last": None}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    log_fields = dict(request_id=rid, model=body.model, user=body.user, kind=kind,
                      prompt_tokens=sum(len(i) for i in ids), n=len(choices))

    def observe_tokens(count: int) -> None:
      now = time.monotonic()
      if count and timing["first"] is None:
        timing["first"] = now
        state.metrics.ttft.observe(now - started)
      elif count and timing["last"] is not None:
        gap = (now - timing["last"]) / count
        for _ in range(count):
          state.metrics.itl.observe(gap)
      if count:
        timing["last"] = now

    def finish_log(status: int):
      completion = sum(len(c.token_ids) for c in choices)
      for c in choices:
        if c.finish_reason:
          state.metrics.finished.labels(c.finish_reason).inc()
      state.metrics.e2e.observe(time.monotonic() - started)
      access_log.info(json.dumps({
          **log_fields, "status": status, "completion_tokens": completion,
          "finish_reasons": sorted({c.finish_reason or "abort" for c in choices}),
          "ttft_s": None if timing["first"] is None else round(timing["first"] - started, 4),
          "latency_s": round(time.monotonic() - started, 4), "stream": body.stream}))

    def apply(prompt_index: int, out) -> list[tuple[_Choice, Any]]:
      changed = []
      for sample in out.outputs:
        c = choices[prompt_index * n + sample.index]
        c.token_ids += sample.token_ids
        c.logprobs += sample.logprobs
        c.text += sample.text
        if sample.finish_reason is not None and c.finish_reason is None:
          c.finish_reason = "stop" if sample.finish_reason == "stop" else "length"
          c.stop_reason = sample.stop_reason
        changed.append((c, sample))
      observe_tokens(max((len(s.token_ids) for s in out.outputs), default=0))
      return changed

    usage = lambda: protocol.usage(log_fields["prompt_tokens"],  # noqa: E731
                                   sum(len(c.token_ids) for c in choices))

    if not body.stream:
      try:
        async for i, out in _merge(streams):
          apply(i, out)
      except EngineDead as e:
        finish_log(503)
        raise APIError(503, str(e)) from None
      response = {"id": rid, "object": kind, "created": int(time.time()), "model": body.model,
                  "choices": [_choice_body(kind, c, tokenizer, body, ids[c.index // n],
                                           tool_mode) for c in choices], "usage": usage()}
      if kind == "chat.completion" and body.return_token_ids:
        response["prompt_token_ids"] = ids[0]
      finish_log(200)
      return response

    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
    created = int(time.time())

    def chunk(choice_bodies, with_usage=None, prompt_token_ids=None):
      data = {"id": rid, "object": chunk_kind, "created": created, "model": body.model,
              "choices": choice_bodies}
      if prompt_token_ids is not None:  # vLLM's place for them in a chat stream
        data["prompt_token_ids"] = prompt_token_ids
      if include_usage:
        data["usage"] = with_usage
      return f"data: {json.dumps(data)}\n\n"

    prompt_ids_sent: set[int] = set()

    async def events():
      status = 200
      try:
        if kind == "chat.completion":  # the role first, as OpenAI sends it
          yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None} for c in choices],
                      prompt_token_ids=ids[0] if body.return_token_ids else None)
        elif echo:
          yield chunk([{"index": c.index, "text": c.text, "logprobs": None,
                        "finish_reason": None} for c in choices])
        async for i, out in _merge(streams):
          changed = apply(i, out)
          if tool_mode is not None:  # each choice whole, once done: it may be a tool call
            bodies = [_tool_delta_body(c, tool_mode) for c, s in changed
                      if s.finish_reason is not None]
          else:
            bodies = [_delta_body(kind, c, s, tokenizer, body) for c, s in changed]
            if kind != "chat.completion" and body.return_token_ids:  # vLLM: on a choice's first
              for b in bodies:
                if b is not None and b["index"] not in prompt_ids_sent:
                  prompt_ids_sent.add(b["index"])
                  b["prompt_token_ids"] = ids[b["index"] // n]
          bodies = [b for b in bodies if b is not None]
          if bodies:
            yield chunk(bodies)
        if include_usage:
          yield chunk([], usage())
        yield "data: [DONE]\n\n"
      except EngineDead as e:
        status = 503
        yield f"data: {json.dumps(APIError(503, str(e)).body())}\n\n"
      except asyncio.CancelledError:
        status = 499  # the client went away: its requests were aborted
        raise
      finally:
        finish_log(status)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

  return app


def _logprobs_body(kind: str, entries: list[dict], tokenizer, offset0: int = 0):
  if kind == "chat.completion":
    content = []
    for e in entries:
      text = _token_text(tokenizer, e["token"]) if tokenizer else str(e["token"])
      content.append({"token": text, "logprob": e["logprob"], "bytes": list(text.encode()),
                      "top_logprobs": [
                          {"token": (t := _token_text(tokenizer, i) if tokenizer else str(i)),
                           "logprob": lp, "bytes": list(t.encode())} for i, lp in e["top"]]})
    return {"content": content}
  tokens, offsets, offset = [], [], offset0
  for e in entries:
    text = _token_text(tokenizer, e["token"]) if tokenizer else str(e["token"])
    tokens.append(text)
    offsets.append(offset)
    offset += len(text)
  return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
          "top_logprobs": [{(_token_text(tokenizer, i) if tokenizer else str(i)): lp
                            for i, lp in e["top"]} for e in entries],
          "text_offset": offsets}


def _tool_message(c: _Choice, tool_mode) -> tuple[dict, str | None]:
  """(the assistant message, finish reason) of a finished choice in tool mode."""
  functions, tool_choice = tool_mode
  if tool_choice == "auto":
    content, calls = tools_lib.parse_tool_calls(c.text, functions)
  else:
    try:
      content, calls = None, tools_lib.forced_calls(c.text, tool_choice)
    except (ValueError, KeyError):  # cut short by max_tokens: not a whole call
      content, calls = c.text, []
  message = {"role": "assistant", "content": content}
  if calls:
    message["tool_calls"] = calls
  return message, ("tool_calls" if calls else c.finish_reason)


def _tool_delta_body(c: _Choice, tool_mode) -> dict:
  message, finish = _tool_message(c, tool_mode)
  delta = {"role": "assistant", "content": message["content"]}
  if "tool_calls" in message:
    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
  return {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish,
          "stop_reason": c.stop_reason}


def _choice_body(kind: str, c: _Choice, tokenizer, body, prompt_ids: list[int],
                 tool_mode=None) -> dict:
  wants_logprobs = body.logprobs is not None and body.logprobs is not False
  logprobs = _logprobs_body(kind, c.logprobs, tokenizer) if wants_logprobs else None
  if kind == "chat.completion":
    message, finish = ({"role": "assistant", "content": c.text}, c.finish_reason) \
        if tool_mode is None else _tool_message(c, tool_mode)
    out = {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish,
           "stop_reason": c.stop_reason}
  else:
    out = {"index": c.index, "text": c.text, "logprobs": logprobs,
           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if body.return_token_ids:
      out["prompt_token_ids"] = prompt_ids
  if body.return_token_ids:
    out["token_ids"] = c.token_ids
  return out


def _delta_body(kind: str, c: _Choice, sample, tokenizer, body) -> dict | None:
  if not sample.text and not sample.token_ids and sample.finish_reason is None:
    return None
  wants_logprobs = body.logprobs is not None and body.logprobs is not False
  logprobs = (_logprobs_body(kind, sample.logprobs, tokenizer)
              if wants_logprobs and sample.logprobs else None)
  finish = c.finish_reason if sample.finish_reason is not None else None
  stop_reason = c.stop_reason if finish is not None else None
  if kind == "chat.completion":
    delta = {"content": sample.text} if sample.text or finish is None else {}
    out = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
           "stop_reason": stop_reason}
  else:
    out = {"index": c.index, "text": sample.text, "logprobs": logprobs, "finish_reason": finish,
           "stop_reason": stop_reason}
  if body.return_token_ids:
    out["token_ids"] = sample.token_ids
  return out


def _render_chat(engine: AsyncEngine, template: str | None, body) -> list[int]:
  """The conversation rendered with the model's chat template, as token ids."""
  from llm.data import chat as chat_lib
  tokenizer = engine.engine.tokenizer
  if tokenizer is None or not template:
    raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
  messages = []
  for i, m in enumerate(body.messages):
    if m.role not in chat_lib.ROLES:
      raise APIError(400, f"messages[{i}].role {m.role!r}; allowed: {list(chat_lib.ROLES)}",
                     f"messages.{i}.role")
    content = m.content
    if isinstance(content, list):
      parts = []
      for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
          raise APIError(400, f"messages[{i}].content: only text parts are supported, got "
                              f"type {part.get('type')!r}", f"messages.{i}.content")
        parts.append(part["text"])
      content = "".join(parts)
    message = {"role": m.role, "content": content or ""}
    if m.name:
      message["name"] = m.name
    if m.tool_calls:
      message["tool_calls"] = m.tool_calls
    if m.tool_call_id:
      message["tool_call_id"] = m.tool_call_id
    messages.append(message)
  if not messages:
    raise APIError(400, "messages: must not be empty", "messages")
  variables = chat_lib.special_token_vars(tokenizer)
  if body.tools and body.tool_choice != "none":
    variables["tools"] = body.tools  # templates that know tools render them
  try:
    text, _ = chat_lib.render(template, messages, variables, add_generation_prompt=True)
  except ValueError as e:
    raise APIError(400, str(e), "messages") from None
  return list(tokenizer.encode_with_offsets(text)[0])
