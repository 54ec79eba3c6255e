"""OpenAI's API shapes: the request bodies of /v1/completions and /v1/chat/completions
(with vLLM's extensions: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
return_token_ids), their translation into the engine's SamplingOptions, and the error
body every 4xx carries: {"error": {"message", "type", "param", "code"}}.

Range checks live once, in SamplingOptions (llm.serve.request); a ValueError from there
becomes a 400 naming the field. Fields OpenAI defines that this server does not implement
(`logit_bias`, `best_of` > 1, `suffix`, audio, ...) are refused by name, never ignored.
"""

from __future__ import annotations

import json
from typing import Any, Union

from pydantic import BaseModel, ConfigDict

from llm.serve.request import SamplingOptions


class APIError(Exception):
  """An OpenAI-shaped error response."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type_: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param
    self.type = type_ or {400: "invalid_request_error", 401: "authentication_error",
                          404: "not_found_error", 429: "rate_limit_error",
                          503: "service_unavailable"}.get(status, "server_error")
    self.code = code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


class _Request(BaseModel):
  # unknown fields are kept (clients send vendor fields) but the unsupported ones OpenAI
  # defines are refused in `check_unsupported`
  model_config = ConfigDict(extra="allow")

  model: str
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  n: int = 1
  stop: Union[str, list[str], None] = None
  seed: int | None = None
  stream: bool = False
  stream_options: dict[str, Any] | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  user: str | None = None
  # vLLM's extensions
  top_k: int | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None
  ignore_eos: bool = False
  stop_token_ids: list[int] | None = None
  return_token_ids: bool = False


UNSUPPORTED = {  # field -> its value that means "off"
    "logit_bias": None, "suffix": None, "audio": None, "modalities": None,
    "prediction": None, "web_search_options": None, "functions": None,
    "function_call": None,
}


def check_unsupported(request: _Request) -> None:
  extra = request.model_extra or {}
  for name, off in UNSUPPORTED.items():
    if extra.get(name, off) not in (off, {}, []):
      raise APIError(400, f"{name!r} is not supported by this server", name)
  best_of = extra.get("best_of")
  if best_of not in (None, 1, request.n):
    raise APIError(400, f"best_of={best_of!r} is not supported (only best_of == n)", "best_of")


class CompletionRequest(_Request):
  prompt: Union[str, list[str], list[int], list[list[int]]]
  echo: bool = False
  logprobs: int | None = None


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")

  role: str
  content: Union[str, list[dict[str, Any]], None] = None
  name: str | None = None
  tool_calls: list[dict[str, Any]] | None = None
  tool_call_id: str | None = None


class ChatCompletionRequest(_Request):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None
  logprobs: bool = False
  top_logprobs: int | None = None
  response_format: dict[str, Any] | None = None
  tools: list[dict[str, Any]] | None = None
  tool_choice: Union[str, dict[str, Any], None] = None
  parallel_tool_calls: bool | None = None


def stops(request: _Request) -> tuple[str, ...]:
  if request.stop is None:
    return ()
  return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)


def sampling_options(request: _Request, max_tokens: int, logprobs: int | None,
                     grammar: str | None = None) -> SamplingOptions:
  """The engine's options for one prompt of the request; a bad value is a 400 naming it."""
  fields = dict(
      max_tokens=max_tokens,
      temperature=1.0 if request.temperature is None else request.temperature,
      top_p=1.0 if request.top_p is None else request.top_p,
      top_k=request.top_k or 0, min_p=request.min_p or 0.0,
      repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
      presence_penalty=request.presence_penalty or 0.0,
      frequency_penalty=request.frequency_penalty or 0.0,
      seed=request.seed, stop=stops(request), stop_token_ids=tuple(request.stop_token_ids or ()),
      ignore_eos=request.ignore_eos, n=request.n, logprobs=logprobs, grammar=grammar)
  if request.top_k == -1:  # vLLM's "off"
    fields["top_k"] = 0
  try:
    return SamplingOptions(**fields)
  except ValueError as e:
    message = str(e)
    param = next((name for name in fields if message.startswith(name)), None)
    raise APIError(400, message, param) from None


def response_format_grammar(response_format: dict | None) -> str | None:
  """The structured-output spec (llm.serve.structured) of a chat `response_format`."""
  from llm.serve.structured import JSON_OBJECT_SPEC, json_schema_spec
  if response_format is None:
    return None
  kind = response_format.get("type")
  if kind == "text":
    return None
  if kind == "json_object":
    return JSON_OBJECT_SPEC
  if kind == "json_schema":
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
      raise APIError(400, "response_format.json_schema must be {'name': ..., 'schema': {...}}",
                     "response_format.json_schema")
    return json_schema_spec(spec.get("schema", {}))
  raise APIError(400, f"response_format.type={kind!r}; allowed: 'text', 'json_object', "
                      "'json_schema'", "response_format.type")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


class ModelCard(BaseModel):
  id: str
  object: str = "model"
  created: int
  owned_by: str = "llm"
  root: str | None = None
  parent: str | None = None
  max_model_len: int | None = None


ERROR_RESPONSES = {code: {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}}}}
    for code, text in ((400, "Bad request"), (401, "Missing or wrong API key"),
                       (404, "Unknown model"), (429, "Queue full"),
                       (503, "Loading or draining"))}


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def field_error_message(errors: list[dict]) -> tuple[str, str | None]:
  """A pydantic validation error as one line naming the field, and the field. The
  alternatives of a union (a prompt is a string, or strings, or token ids, ...) are
  reported as one error about the field."""

  def field_path(error):
    path = []
    for part in error.get("loc", ()):
      if part == "body":
        continue
      if isinstance(part, str) and (part.split("[")[0] in TYPE_TAGS or "[" in part):
        break  # a union member's tag: what follows is inside one alternative
      path.append(str(part))
    return ".".join(path) or None

  first = errors[0]
  param = field_path(first)
  same_field = [e for e in errors if field_path(e) == param]
  got = f" (got {json.dumps(first['input'], default=str)[:80]})" if "input" in first else ""
  if len(same_field) > 1:
    return f"{param or 'body'}: is none of the allowed forms{got}", param
  return f"{param or 'body'}: {first.get('msg', 'invalid')}{got}", param


