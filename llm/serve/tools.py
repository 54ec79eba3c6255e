"""Tool calling for the chat endpoint: the request's `tools` and `tool_choice` checked,
the grammar a forced choice constrains decoding with, and tool calls parsed from the text
a model writes in its chat template's own format:
  - Hermes / Qwen: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeatable;
  - Llama 3 JSON: {"name": ..., "parameters": {...}} (after an optional <|python_tag|>),
    several separated by ";".
With tool_choice "auto" the model decides and the text is parsed; with a named function
or "required", decoding is constrained to the arguments (or to {"name", "arguments"} of
one of the tools), so the call is always well formed.
"""

from __future__ import annotations

import json
import re
import uuid

from llm.serve.protocol import APIError
from llm.serve.structured import json_schema_spec

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def check_tools(tools: list | None, tool_choice) -> tuple[dict[str, dict], object]:
  """({name: function}, the effective tool_choice); 400s name the bad part."""
  functions: dict[str, dict] = {}
  for i, tool in enumerate(tools or []):
    fn = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(
        fn.get("name"), str) or not fn["name"]:
      raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': "
                          "..., 'parameters': {...}}}}}", f"tools.{i}")
    params = fn.get("parameters", {"type": "object"})
    if not isinstance(params, dict):
      raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                     f"tools.{i}.function.parameters")
    functions[fn["name"]] = {**fn, "parameters": params}
  if tool_choice is None:
    tool_choice = "auto" if functions else "none"
  if isinstance(tool_choice, str):
    if tool_choice not in ("none", "auto", "required"):
      raise APIError(400, f"tool_choice={tool_choice!r}; allowed: 'none', 'auto', "
                          "'required' or {'type': 'function', 'function': {'name': ...}}",
                     "tool_choice")
    if tool_choice != "none" and not functions:
      raise APIError(400, f"tool_choice={tool_choice!r} needs tools", "tool_choice")
    return functions, tool_choice
  name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
  if name not in functions:
    raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools "
                        f"{sorted(functions)}", "tool_choice")
  return functions, {"name": name}


def forced_grammar(functions: dict[str, dict], tool_choice) -> str | None:
  """The grammar of a forced choice: the named function's arguments, or for "required"
  an object {"name": one of the tools, "arguments": its arguments}."""
  if isinstance(tool_choice, dict):
    return json_schema_spec(functions[tool_choice["name"]]["parameters"])
  if tool_choice == "required":
    return json_schema_spec({"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": fn["parameters"]},
         "required": ["name", "arguments"], "additionalProperties": False}
        for name, fn in functions.items()]})
  return None


def _call(name: str, arguments) -> dict:
  args = arguments if isinstance(arguments, str) else json.dumps(arguments)
  return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
          "function": {"name": name, "arguments": args}}


def forced_calls(text: str, tool_choice) -> list[dict]:
  """The call a forced choice produced (its output is JSON by construction)."""
  if isinstance(tool_choice, dict):
    return [_call(tool_choice["name"], text)]
  obj = json.loads(text)
  return [_call(obj["name"], obj["arguments"])]


def parse_tool_calls(text: str, functions: dict[str, dict]) -> tuple[str | None, list[dict]]:
  """(remaining content or None, tool calls) from a model's free text; calls of unknown
  functions or malformed JSON are left as content."""
  calls = []
  for m in HERMES.finditer(text):
    try:
      obj = json.loads(m.group(1))
    except json.JSONDecodeError:
      continue
    if isinstance(obj, dict) and obj.get("name") in functions:
      calls.append(_call(obj["name"], obj.get("arguments", {})))
  if calls:
    content = HERMES.sub("", text).strip()
    return content or None, calls
  body = text.strip().removeprefix("<|python_tag|>").strip()
  for part in (p.strip() for p in body.split(";")):
    try:
      obj = json.loads(part)
    except json.JSONDecodeError:
      return text, []
    if not (isinstance(obj, dict) and obj.get("name") in functions):
      return text, []
    calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
  return (None, calls) if calls else (text, [])
