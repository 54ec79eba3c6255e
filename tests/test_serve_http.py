"""The OpenAI-compatible server (llm.serve.server) through the real `openai` client, sync
and async, on a tiny random HF Llama with a byte-level BPE tokenizer trained here:
completions and chat, streamed and not, n > 1, stop strings, logprobs, seeds, echo,
token ids (greedy ones equal transformers' `generate`), OpenAI-shaped errors, client
disconnects freeing pages, /metrics, and SIGTERM draining a `python -m llm.serve`."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from llm.data.chat import CHATML  # noqa: E402
from llm.serve.async_engine import AsyncEngine  # noqa: E402
from llm.serve.engine import Engine  # noqa: E402
from llm.serve.server import ServerState, build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=64, num_pages=96, page_size=8,
                   max_model_len=192)


def make_hf_dir(root: Path) -> Path:
  """A random fp32 Llama and a byte-level BPE tokenizer (trained on stdlib text) with a
  ChatML template, saved as a Hugging Face directory."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  out = root / "tiny-llama"
  out.mkdir()
  texts = [p.read_text() for p in sorted((Path(os.__file__).parent).glob("[a-c]*.py"))[:12]]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|endoftext|>", "chat_template": CHATML}))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64,
                                 intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # sharper logits than at init: greedy ties cannot hide a bug
    for p in model.parameters():
      p.mul_(4.0 if p.ndim == 2 else 1.0)
  model.save_pretrained(out)
  return out


class _Server:
  """An app on 127.0.0.1 (a free port) in a thread of this process."""

  def __init__(self, state: ServerState):
    self.state = state
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=0, log_level="warning")
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return make_hf_dir(tmp_path_factory.mktemp("serve_http"))


@pytest.fixture(scope="module")
def served(hf_dir):
  engine = AsyncEngine(Engine.from_hf(hf_dir, **ENGINE_ARGS))
  state = ServerState(model_name="tiny", api_key="sekrit", max_queued=64, engine=engine,
                      chat_template=engine.engine.chat_template)
  server = _Server(state)
  yield server
  server.stop()
  engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
  return openai.OpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0)


def _hf_greedy(hf_dir, ids, n):
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
  return out[0, len(ids):].tolist()


def _gauge(url, name) -> float:
  text = httpx.get(url + "/metrics").text
  return float(next(line.split()[-1] for line in text.splitlines()
                    if line.startswith(name + " ")))


def _pages_used(url) -> float:
  return _gauge(url, "llm_kv_pages_used")


def test_completions_match_transformers_and_stream_equals_whole(client, served, hf_dir):
  prompt = "def main():\n    return"
  whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
  choice = whole.choices[0]
  prompt_ids = choice.model_extra["prompt_token_ids"]
  assert choice.model_extra["token_ids"] == _hf_greedy(hf_dir, prompt_ids, 12)
  assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 12
  assert whole.usage.total_tokens == len(prompt_ids) + 12 and choice.finish_reason == "length"
  assert whole.object == "text_completion" and whole.id.startswith("cmpl-")

  chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True,
                                                      "return_token_ids": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
  assert chunks[0].choices[0].model_extra["prompt_token_ids"] == prompt_ids
  assert sum((c.choices[0].model_extra["token_ids"] for c in chunks if c.choices), []) == \
      choice.model_extra["token_ids"]
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

  echo = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                   echo=True)
  assert echo.choices[0].text.startswith(prompt)

  # a stop string ends the text where it first appears
  stop = choice.text[4:6]
  stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                      temperature=0, stop=[stop], extra_body={"ignore_eos": True})
  assert stopped.choices[0].text == choice.text[:choice.text.find(stop)]
  assert stopped.choices[0].finish_reason == "stop"
  assert stopped.choices[0].model_extra["stop_reason"] == stop  # vLLM's field
  assert choice.model_extra["stop_reason"] is None  # ended by length


def test_batched_prompts_n_seeds_and_logprobs(client):
  ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2,
                                  temperature=0, extra_body={"ignore_eos": True})
  assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
  out = client.completions.create(model="tiny", prompt=["import os", "class A:"], n=2,
                                  max_tokens=6, temperature=1.0, seed=7, logprobs=3,
                                  extra_body={"ignore_eos": True})
  assert [c.index for c in out.choices] == [0, 1, 2, 3]
  for c in out.choices:
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
  assert out.choices[0].text != out.choices[1].text  # the n samples differ
  again = client.completions.create(model="tiny", prompt=["import os", "class A:"], n=2,
                                    max_tokens=6, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
  assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded


def test_chat_whole_and_streamed_with_logprobs(client, hf_dir):
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Say something about files."}]
  whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"return_token_ids": True})
  msg = whole.choices[0].message
  assert msg.role == "assistant" and whole.object == "chat.completion"
  entries = whole.choices[0].logprobs.content
  assert len(entries) == len(whole.choices[0].model_extra["token_ids"])
  assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in entries)
  # the prompt is the ChatML rendering, token for token as transformers renders it
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
  assert whole.model_extra["prompt_token_ids"] == list(expected)

  stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                          temperature=0, stream=True)
  chunks = list(stream)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_async_client_many_streams(served):
  async def run():
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0)

    async def one(i):
      stream = await client.completions.create(
          model="tiny", prompt=f"class C{i}:", max_tokens=5 + i, temperature=0.8, seed=i,
          stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
      tokens, usage = 0, None
      async for chunk in stream:
        if chunk.usage is not None:
          usage = chunk.usage
      tokens = usage.completion_tokens
      return tokens

    return await asyncio.gather(*(one(i) for i in range(12)))

  assert asyncio.run(run()) == [5 + i for i in range(12)]
  assert _pages_used(served.url) == 0


def _post(url, path, body, key="sekrit"):
  return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                    timeout=30)


def test_errors_are_openai_shaped_and_name_the_field(served):
  url = served.url
  cases = [
      ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
      ({"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
      ({"model": "tiny", "prompt": []}, 400, "prompt"),
      ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
      ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
      ({"model": "tiny", "prompt": [[5, 99999]]}, 400, "prompt"),
      ({"model": "tiny", "prompt": ["x", [5, 6]]}, 400, "prompt"),
      ({"model": "tiny"}, 400, "prompt"),
      ({"model": "nope", "prompt": "x"}, 404, "model"),
  ]
  for body, status, param in cases:
    r = _post(url, "/v1/completions", body)
    assert r.status_code == status, (body, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and param in err["message"], err
  r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, key="wrong")
  assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
  r = httpx.post(url + "/v1/completions", content=b"{not json",
                 headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
  assert r.status_code == 400
  r = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot",
                                                                          "content": "x"}]})
  assert r.status_code == 400 and "robot" in r.json()["error"]["message"]
  with pytest.raises(openai.BadRequestError, match="max_tokens"):
    openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0).completions.create(
        model="tiny", prompt="x", max_tokens=10_000)


def test_disconnected_streams_free_their_pages_and_metrics(served):
  with httpx.stream("POST", served.url + "/v1/completions", headers={
      "Authorization": "Bearer sekrit"}, json={"model": "tiny", "prompt": "import sys",
                                                "max_tokens": 150, "stream": True,
                                                "ignore_eos": True}) as r:
    for line in r.iter_lines():
      if line.startswith("data: {"):
        break  # one chunk, then hang up
  for _ in range(100):
    if _pages_used(served.url) == 0 and not served.state.engine.in_flight:
      break
    time.sleep(0.05)
  assert _pages_used(served.url) == 0
  text = httpx.get(served.url + "/metrics").text
  for name in ("llm_time_to_first_token_seconds_bucket", "llm_inter_token_latency_seconds_count",
               "llm_e2e_request_latency_seconds_sum", "llm_prompt_tokens_total",
               "llm_generation_tokens_total", "llm_requests_running", "llm_requests_waiting",
               "llm_kv_pages_free", "llm_prefix_cache_hit_rate", "llm_preemptions_total",
               'llm_requests_total{endpoint="/v1/completions",status="200"}'):
    assert name in text, name
  models = httpx.get(served.url + "/v1/models", headers={"Authorization": "Bearer sekrit"})
  assert models.json()["data"][0]["id"] == "tiny"


def test_health_loading_and_queue_full(served):
  from fastapi.testclient import TestClient
  state = ServerState(model_name="tiny", max_queued=0)
  client = TestClient(build_app(state))
  r = client.get("/health")
  assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
  r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
  assert r.status_code == 503
  full = TestClient(build_app(ServerState(model_name="tiny", max_queued=0,
                                          engine=served.state.engine)))
  r = full.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
  assert r.status_code == 429 and "max_queued=0" in r.json()["error"]["message"]
  assert r.json()["error"]["type"] == "rate_limit_error"


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(hf_dir):
  """`python -m llm.serve` under load (speculating by prompt lookup): SIGTERM, then new
  requests get 503 while every in-flight stream still ends with [DONE], and the process
  exits 0."""
  import concurrent.futures
  port_file = hf_dir.parent / "port"
  proc = subprocess.Popen(
      [sys.executable, "-m", "llm.serve", f"--hf_dir={hf_dir}", "--port=0", "--max_num_seqs=2",
       "--max_num_batched_tokens=64", "--max_model_len=192", "--page_size=8",
       "--kv_cache_gib=0.01", "--grace_seconds=120", f"--port_file={port_file}",
       "--speculative_method=ngram", "--num_speculative_tokens=3", "--prompt_lookup_min=1"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  first_chunk = threading.Event()

  def stream(url):
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json={
        "model": "tiny-llama", "prompt": "import os", "max_tokens": 150, "stream": True,
        "ignore_eos": True}, timeout=120) as r:
      for line in r.iter_lines():
        if line:
          lines.append(line)
          first_chunk.set()
    return lines

  try:
    deadline = time.monotonic() + 120
    while not port_file.exists():
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.1)
    url = f"http://127.0.0.1:{port_file.read_text().strip()}"
    while httpx.get(url + "/health").status_code != 200:
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.2)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      streams = [pool.submit(stream, url) for _ in range(6)]  # 2 run, 4 wait
      assert first_chunk.wait(60)
      while _gauge(url, "llm_requests_running") + _gauge(url, "llm_requests_waiting") < 6:
        assert time.monotonic() < deadline
        time.sleep(0.02)
      assert _gauge(url, "llm_spec_decode_num_draft_tokens_total") >= 0
      proc.send_signal(signal.SIGTERM)
      time.sleep(0.3)
      refused = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": "x"})
      assert refused.status_code == 503 and "shutting down" in refused.text
      assert httpx.get(url + "/health").status_code == 503
      for s in streams:
        lines = s.result(timeout=120)
        assert lines[-1] == "data: [DONE]"
        assert sum(len(json.loads(x[6:])["choices"][0].get("text", "")) > 0
                   for x in lines[:-1]) > 0
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
    out = proc.stdout.read()
  assert out.count('"status": 200') == 6, out[-2000:]  # one access-log line per request


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
             "required": ["zone"], "additionalProperties": False}}}]


def test_structured_outputs_and_tool_calls(served):
  """json_schema / json_object responses parse and validate (jsonschema), in the same
  batches as unconstrained requests, which keep their own tokens; forced tool choices
  give well-formed tool_calls."""
  jsonschema = pytest.importorskip("jsonschema")
  messages = [{"role": "user", "content": "Weather in Paris?"}]

  async def run():
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="sekrit", max_retries=0)
    plain = dict(model="tiny", messages=messages, max_tokens=12, temperature=0)
    alone = await client.chat.completions.create(**plain)
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    together = await asyncio.gather(
        client.chat.completions.create(**plain),
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=80,
                                       temperature=1.0, seed=1, response_format=schema_fmt),
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=80,
                                       temperature=1.0, seed=2,
                                       response_format={"type": "json_object"}),
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=80,
                                       temperature=1.0, seed=3, tools=TOOLS,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "get_weather"}}),
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=80,
                                       temperature=1.0, seed=4, tools=TOOLS,
                                       tool_choice="required", stream=False))
    return alone, together

  alone, (plain, schema, obj, named, required) = asyncio.run(run())
  assert plain.choices[0].message.content == alone.choices[0].message.content
  jsonschema.validate(json.loads(schema.choices[0].message.content), WEATHER)
  assert schema.choices[0].finish_reason == "stop"
  assert isinstance(json.loads(obj.choices[0].message.content), dict)
  (call,) = named.choices[0].message.tool_calls
  assert call.function.name == "get_weather" and call.type == "function"
  jsonschema.validate(json.loads(call.function.arguments), WEATHER)
  assert named.choices[0].finish_reason == "tool_calls"
  (call,) = required.choices[0].message.tool_calls
  schema_of = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
  jsonschema.validate(json.loads(call.function.arguments), schema_of[call.function.name])

  bad = _post(served.url, "/v1/chat/completions", {
      "model": "tiny", "messages": messages, "response_format": {
          "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}})
  assert bad.status_code == 400 and "objectx" in bad.json()["error"]["message"]
  bad = _post(served.url, "/v1/chat/completions", {
      "model": "tiny", "messages": messages, "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}})
  assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_tool_calls_parsed_from_template_formats():
  from llm.serve.tools import check_tools, parse_tool_calls
  functions, choice = check_tools(TOOLS, None)
  assert choice == "auto"
  text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"unit": "C", "days": 2}}\n</tool_call>')
  content, calls = parse_tool_calls(text, functions)  # Hermes / Qwen
  assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
  assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "C", "days": 2}
  content, calls = parse_tool_calls(  # Llama 3 JSON, two calls
      '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
      '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F", "days": 1}}',
      functions)
  assert content is None and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
  assert parse_tool_calls("plain words", functions) == ("plain words", [])
  assert parse_tool_calls('{"name": "unknown", "parameters": {}}', functions)[1] == []


@pytest.fixture(scope="module")
def fuzz_app(served):
  """The same engine behind an app without an API key, for schemathesis to reach every
  field's validation."""
  state = served.state
  return build_app(ServerState(model_name="tiny", engine=state.engine,
                               chat_template=state.chat_template, max_queued=64))


def test_fuzzed_requests_never_get_a_5xx(fuzz_app, served):
  """Schemathesis over the server's own OpenAPI schema, bounded examples per operation:
  every answer is below 500, and every 4xx carries OpenAI's error shape."""
  schemathesis = pytest.importorskip("schemathesis")
  from hypothesis import HealthCheck, given, settings
  schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
  operations = [result.ok() for result in schema.get_all_operations()]
  assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions",
                                            "/v1/models", "/health", "/metrics"}
  statuses: dict[int, int] = {}
  for op in operations:
    @given(case=op.as_strategy())
    @settings(max_examples=60 if op.method == "post" else 3, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
      if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"  # past the 404, into every field's checks
      response = case.call()
      statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
      assert response.status_code < 500, (case.body, response.text[:300])
      if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    fuzz()
  assert statuses.get(200, 0) > 10, statuses  # some fuzzed requests were served
  for _ in range(500):  # nothing left running from a fuzzed request
    if not served.state.engine.in_flight:
      break
    time.sleep(0.01)
  assert not served.state.engine.in_flight and _pages_used(served.url) == 0


def _rss_mib() -> float:
  return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_load_64_streaming_clients(served):
  """64 concurrent streaming clients for LLM_LOAD_SECONDS (default 60) on the tiny model:
  every stream ends with [DONE], its streamed token ids count what `usage` says, no page
  is left held afterwards, and the process's memory stays flat (the last two thirds of
  the run grow it by under 64 MiB)."""
  seconds = float(os.environ.get("LLM_LOAD_SECONDS", "60"))
  state = served.state
  server = _Server(ServerState(model_name="tiny", engine=state.engine,
                               chat_template=state.chat_template, max_queued=256))
  done, mismatched, rss = [], [], {}

  async def client(i, deadline):
    import random
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
      while time.monotonic() < deadline:
        body = {"model": "tiny", "prompt": "".join(rng.choice("abcdefgh \n") for _ in range(
            rng.randint(1, 60))), "max_tokens": rng.randint(1, 40), "stream": True,
            "temperature": 1.0, "seed": rng.randint(0, 2**31), "return_token_ids": True,
            "stream_options": {"include_usage": True}}
        if rng.random() < 0.3:  # chat too
          body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        lines, streamed = [], 0
        async with http.stream("POST", path, json=body) as r:
          assert r.status_code == 200, await r.aread()
          async for line in r.aiter_lines():
            if line.startswith("data: {"):
              data = json.loads(line[6:])
              streamed += sum(len(c.get("token_ids") or []) for c in data["choices"])
              if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            if line:
              lines.append(line)
        done.append(lines[-1] == "data: [DONE]")
        if streamed != usage:
          mismatched.append((body, streamed, usage))

  async def run():
    t0 = time.monotonic()
    deadline = t0 + seconds

    async def sample_rss():
      while time.monotonic() < deadline:
        await asyncio.sleep(seconds / 3)
        rss[round((time.monotonic() - t0) / seconds * 3)] = _rss_mib()

    await asyncio.gather(sample_rss(), *(client(i, deadline) for i in range(64)))

  try:
    asyncio.run(run())
  finally:
    server.stop()
  assert len(done) > 64 and all(done), (len(done), done.count(False))
  assert not mismatched, mismatched[:3]
  assert _pages_used(served.url) == 0 and not state.engine.in_flight
  first, last = min(rss), max(rss)
  assert rss[last] - rss[first] < 64, rss


def test_lora_adapters_are_models_of_their_own(tokenizer_path):
  """`model` selects an adapter; /v1/models lists each with the base as parent; adapter
  and base requests run in the same batches and give their own tokens."""
  import jax

  from llm.data.tokenizer import open_tokenizer
  from llm.model import init_params, lora, make_model, unbox
  from llm.serve.request import SamplingOptions
  from tests.helpers import tiny_config
  base_cfg, cfg = tiny_config(), tiny_config()
  cfg.model.lora.update(rank=2, targets="q,v")
  base = unbox(init_params(make_model(base_cfg.model), jax.random.key(0), 8))
  adapters = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape),
                          lora.split(unbox(init_params(make_model(cfg.model),
                                                       jax.random.key(2), 8)))[1])
  engine = Engine(base_cfg.model, base, open_tokenizer(tokenizer_path), page_size=4,
                  num_pages=64, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64,
                  buckets=(8, 32), adapters={"terse": (cfg.model, lora.join(base, adapters))})
  runner = AsyncEngine(engine)
  server = _Server(ServerState(model_name="base", engine=runner))
  try:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "terse"} and cards["terse"].model_extra["parent"] == "base"

    async def both():
      aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
      return await asyncio.gather(*(aclient.completions.create(
          model=m, prompt="def f(x):", max_tokens=6, temperature=0,
          extra_body={"return_token_ids": True, "ignore_eos": True})
          for m in ("terse", "base", "terse")))

    outs = [o.choices[0].model_extra["token_ids"] for o in asyncio.run(both())]
    assert outs[0] == outs[2] != outs[1]
    with pytest.raises(openai.NotFoundError, match="served: \\['base', 'terse'\\]"):
      client.completions.create(model="other", prompt="x")
  finally:
    server.stop()
    runner.shutdown()
  direct = engine.add_request(engine.tokenizer.bos_prefix() + list(engine.tokenizer.encode(
      "def f(x):")), SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True),
      adapter="terse")
  got = []
  while engine.has_unfinished():
    got += [t for o in engine.step() if o.request_id == direct for t in o.outputs[0].token_ids]
  assert got == outs[0]
