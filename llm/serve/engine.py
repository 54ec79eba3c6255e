"""The serving engine: requests in, streamed tokens out, scheduled continuously over a
paged KV cache with prefix caching and chunked prefill.

    engine = Engine.from_workdir("runs/tiny", max_num_seqs=16)
    rid = engine.add_request("Romeo.", SamplingOptions(max_tokens=32, temperature=0.8))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.outputs[0].text, end="")

or, from asyncio, through llm.serve.async_engine.AsyncEngine (the engine on its own
thread): `async for out in AsyncEngine(engine).generate(prompt, options): ...`.

Each `step()` asks the scheduler (llm.serve.scheduler) who runs, lays their tokens out as
one flat batch for the model runner (llm.serve.runner), appends the sampled tokens,
applies each request's stops, offers newly full pages to the prefix cache, and returns
what each request gained. `abort(request_id)` frees its pages at once. `metrics()` holds
the counters a server exports.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from pathlib import Path

import numpy as np

from llm.config import check_range
from llm.serve.pages import PagePool
from llm.serve.request import SamplingOptions, Sequence, Status
from llm.serve.runner import ModelRunner
from llm.serve.scheduler import Scheduler


@dataclasses.dataclass
class SampleOutput:
  index: int  # among the request's n samples
  token_ids: list[int]  # new since the last output
  text: str  # new since the last output
  logprobs: list[dict]  # per new token: {"token", "logprob", "top": [(id, logprob), ...]}
  finish_reason: str | None
  stop_reason: int | str | None = None  # the stop token id or string that ended it (vLLM's)
  stop_logprob: float | None = None  # that token's log-probability, when logprobs were asked
  # speculative decoding, so far: verification steps that carried drafts, draft tokens
  # proposed, and accepted (see acceptance_rate / mean_accepted_length)
  spec_steps: int = 0
  spec_draft_tokens: int = 0
  spec_accepted_tokens: int = 0

  @property
  def acceptance_rate(self) -> float:
    """Accepted / proposed draft tokens (nan before any)."""
    return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else math.nan

  @property
  def mean_accepted_length(self) -> float:
    """Tokens emitted per verification step that carried drafts, its own token included
    (vLLM's mean acceptance length: 1 + accepted / steps; nan before any)."""
    return 1 + self.spec_accepted_tokens / self.spec_steps if self.spec_steps else math.nan


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt_token_ids: list[int]
  outputs: list[SampleOutput]
  finished: bool


# kv_cache_dtype -> model.kv_quant ("auto": the model config's own)
KV_CACHE_DTYPES = {"auto": None, "int8": "int8"}


def _default_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
  buckets, b = [], 16
  while b < max_num_batched_tokens:
    buckets.append(b)
    b *= 4
  return tuple(buckets + [max_num_batched_tokens])


class Engine:
  """See the module docstring. `tokenizer` (optional) turns text prompts into ids and
  outputs into text, and gives the EOS / end-of-turn ids that stop a request. `mesh`
  (optional) shards weights and KV pages by the logical-axis rules (llm.parallel).
  `chat_template` (default: the tokenizer's own) renders a server's chat requests.
  `adapters` ({name: (model config, params)} of LoRA runs on this base, see
  `load_adapter`) are served over the base weights, a request choosing one by name.
  `speculative` (llm.serve.speculative.SpeculativeConfig) turns on speculative decoding;
  its draft model comes from its draft_workdir, or `draft_model` = (model config, params).
  `kv_cache_dtype` (vLLM's name): auto (the model's dtype, or its model.kv_quant) | int8
  (keys and values int8 with a scale per token and head: about half of bf16's pages)."""

  def __init__(self, model_cfg, params, tokenizer=None, *, page_size: int = 16,
               num_pages: int = 0, kv_cache_gib: float = 0.0, max_num_batched_tokens: int = 256,
               max_num_seqs: int = 16, max_model_len: int = 0, prefix_caching: bool = True,
               buckets: tuple[int, ...] = (), seed: int = 0, warm_up: bool = True,
               mesh=None, chat_template: str | None = None, adapters: dict | None = None,
               speculative=None, draft_model: tuple | None = None,
               kv_cache_dtype: str = "auto"):
    check_range("page_size", page_size, lo=1)
    check_range("max_num_batched_tokens", max_num_batched_tokens, lo=1)
    check_range("max_num_seqs", max_num_seqs, lo=1)
    check_range("kv_cache_gib", kv_cache_gib, lo=0, note="0: num_pages, or memory left")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}; allowed: {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype != "auto":
      import ml_collections
      model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
      model_cfg.kv_quant = KV_CACHE_DTYPES[kv_cache_dtype]
    max_model_len = max_model_len or 2048
    check_range("max_model_len", max_model_len, lo=2)
    self.speculative = speculative
    if speculative is not None and speculative.method == "draft":
      from llm.serve.speculative import load_draft
      draft_model = load_draft(speculative, model_cfg, tokenizer, draft_model)
    if not num_pages:
      per_page = ModelRunner.kv_bytes_per_page(model_cfg, page_size)
      if speculative is not None and speculative.method == "draft":
        per_page += ModelRunner.kv_bytes_per_page(draft_model[0], page_size)
      budget = kv_cache_gib * 2**30 if kv_cache_gib else _memory_left(params) * 0.5
      num_pages = int(budget // per_page)
    pages_per_seq = -(-max_model_len // page_size)
    if num_pages - 1 < pages_per_seq:
      raise ValueError(f"the KV cache holds {num_pages - 1} pages of {page_size} tokens, fewer "
                       f"than one max_model_len={max_model_len} sequence needs "
                       f"({pages_per_seq}); give more num_pages / kv_cache_gib or a shorter "
                       "max_model_len")
    self.tokenizer = tokenizer
    self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or None
    self.max_model_len = max_model_len
    self.pool = PagePool(num_pages, page_size)
    self.scheduler = Scheduler(self.pool, max_num_batched_tokens, max_num_seqs, prefix_caching)
    buckets = tuple(sorted(set(buckets))) or _default_buckets(max_num_batched_tokens)
    if buckets[-1] < max_num_batched_tokens:
      raise ValueError(f"buckets={buckets}: the largest must hold max_num_batched_tokens="
                       f"{max_num_batched_tokens}")
    from llm.serve.lora import Adapters
    self.adapters = Adapters(model_cfg, adapters or {})
    head_kwargs = {}
    if speculative is not None:
      from llm.serve import speculative as spec_lib
      head_kwargs = dict(head=spec_lib.verify_head,
                         row_fields=spec_lib.verify_row_fields(speculative, model_cfg.vocab_size))
    self.runner = ModelRunner(model_cfg, params, num_pages, page_size, max_num_seqs,
                              max_model_len, buckets, mesh,
                              self.adapters if adapters else None, **head_kwargs)
    self.proposer = None
    if speculative is not None:
      proposer_cls = spec_lib.PROPOSERS[speculative.method]
      self.proposer = (proposer_cls(speculative, self, *draft_model)
                       if speculative.method == "draft" else proposer_cls(speculative, self))
    self.vocab_size = model_cfg.vocab_size
    self.stop_ids: set[int] = set()
    if tokenizer is not None:
      from llm.data.chat import stop_ids
      self.stop_ids = set(stop_ids(tokenizer))
    self._rng = np.random.default_rng(seed)
    self._requests: dict[str, list[Sequence]] = {}
    self._ids = itertools.count()
    self.counters = dict(requests=0, finished=0, aborted=0, prompt_tokens=0, generation_tokens=0,
                         steps=0, batched_tokens=0, forked_samples=0, spec_decode_num_drafts=0,
                         spec_decode_num_draft_tokens=0, spec_decode_num_accepted_tokens=0)
    self.latencies = _recent_latencies()
    self._siblings: dict[str, list[Sequence]] = {}  # samples 2..n, until 1 ran the prompt
    self._grammars = None
    if warm_up:
      self.runner.warm_up()
      if self.proposer is not None:
        self.proposer.warm_up()

  # ----------------------------------------------------------------- construction

  @classmethod
  def from_workdir(cls, workdir: str | Path, **kwargs) -> "Engine":
    """From a training workdir (pretrained, SFT, LoRA merged, MoE) or a converted one;
    `loras={name: workdir}` serves LoRA runs trained on it as adapters."""
    from llm.data.chat import TEMPLATES
    from llm.inference import load
    config, params, tokenizer = load(workdir)
    loras = kwargs.pop("loras", None) or {}
    if loras:
      kwargs["adapters"] = {name: cls.load_adapter(path, workdir) for name, path in loras.items()}
    kwargs.setdefault("max_model_len", config.data.seq_len)
    kwargs.setdefault("chat_template", TEMPLATES.get(config.data.chat.template))
    return cls(config.model, params, tokenizer, **kwargs)

  @staticmethod
  def load_adapter(workdir: str | Path, base_workdir: str | Path | None = None) -> tuple:
    """(model config, params with their adapters unmerged) of a LoRA run, for
    `adapters=`. With `base_workdir`, a run trained on another base is refused."""
    from llm.workdir import load_params
    config, params = load_params(workdir, merge_lora=False)
    if not config.model.lora.rank:
      raise ValueError(f"{str(workdir)!r} is not a LoRA run (model.lora.rank is 0): serve it "
                       "as a model of its own")
    base = config.train.init_params
    if base_workdir is not None and base and Path(base).resolve() != Path(base_workdir).resolve():
      raise ValueError(f"the LoRA run {str(workdir)!r} was trained on {base!r}, not on the "
                       f"served {str(base_workdir)!r}")
    return config.model, params

  @classmethod
  def from_hf(cls, hf_dir: str | Path, **kwargs) -> "Engine":
    """From a Hugging Face model directory, through the converter (llm.convert), in
    memory: nothing is written."""
    from llm import config as config_lib
    from llm.convert import hf
    from llm.convert.__main__ import read_hf_config
    from llm.data.tokenizer import open_tokenizer
    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    model_cfg = config_lib.base_config().model
    model_cfg.update(hf.model_updates_from_hf(hf_cfg))
    params = hf.hf_to_params(hf.SafetensorsReader(hf_dir), model_cfg)
    tok_path = next((hf_dir / n for n in ("tokenizer.json", "tokenizer.model")
                     if (hf_dir / n).is_file()), None)
    kwargs.setdefault("max_model_len", int(hf_cfg.get("max_position_embeddings", 2048)))
    return cls(model_cfg, params, open_tokenizer(tok_path) if tok_path else None, **kwargs)

  # ----------------------------------------------------------------- requests

  def add_request(self, prompt, options: SamplingOptions | None = None,
                  request_id: str | None = None, adapter: str = "") -> str:
    """Queues a prompt (text, with a tokenizer, or token ids) for the base model or the
    named LoRA adapter; returns its id."""
    options = options or SamplingOptions()
    ids = self.check_prompt(prompt, options)
    slot = self.adapters.slot(adapter)
    request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
    if request_id in self._requests:
      raise ValueError(f"request id {request_id!r} is already in use")
    seed = options.seed if options.seed is not None else int(self._rng.integers(2**31))
    now = time.monotonic()
    seqs = [Sequence(request_id, ids, options, seed + i, now, sample=i, adapter=slot,
                     matcher=self.grammars().matcher(options.grammar) if options.grammar else None)
            for i in range(options.n)]
    for seq in seqs:
      seq.speculates = (self.speculative is not None and not options.uses_penalties
                        and options.grammar is None)
    self._requests[request_id] = seqs
    # the other samples wait until the first has run the prompt, then find its pages
    self.scheduler.add(seqs[0])
    if len(seqs) > 1:
      self._siblings[request_id] = seqs[1:]
    self.counters["requests"] += 1
    self.counters["prompt_tokens"] += len(ids)
    return request_id

  def check_prompt(self, prompt, options: SamplingOptions) -> list[int]:
    """The prompt's token ids, or a ValueError naming what is wrong with the request.
    Reads nothing that steps change, so another thread may call it while the engine runs."""
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs the engine's tokenizer; give token ids")
      ids = self.tokenizer.bos_prefix() + list(self.tokenizer.encode(prompt))
    else:
      ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < self.vocab_size]
    if bad:
      raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, "
                       f"{self.vocab_size})")
    if len(ids) + options.max_tokens > self.max_model_len:
      raise ValueError(f"the prompt's {len(ids)} tokens + max_tokens={options.max_tokens} "
                       f"exceed max_model_len={self.max_model_len}")
    if options.grammar:
      self.grammars().check(options.grammar)
    return ids

  def grammars(self):
    """The structured-output compiler (llm.serve.structured), made on first use."""
    if self._grammars is None:
      if self.tokenizer is None:
        raise ValueError("structured outputs need the engine's tokenizer")
      from llm.serve.structured import Grammars
      self._grammars = Grammars(self.tokenizer, self.vocab_size)
    return self._grammars

  def abort(self, request_id: str) -> None:
    """Stops a request now; its pages are freed at once (unknown ids are ignored)."""
    self._siblings.pop(request_id, None)
    for seq in self._requests.pop(request_id, []):
      if seq.status is not Status.FINISHED:
        self.scheduler.finish(seq, "abort")
    self.counters["aborted"] += 1

  def set_params(self, params) -> None:
    """New weights for the next steps (a trainer's, read in place: see
    ModelRunner.set_params); the prefix cache, computed with the old ones, is forgotten.
    None drops the engine's hold on them (nothing may run until new ones are set)."""
    self.runner.set_params(params)
    self.pool.reset_cache()

  def reset_state(self) -> None:
    """Forgets every page and cached prefix, so that the next requests are laid out and
    computed exactly as in a fresh engine (an RL round sampled again after a resume is the
    same, bit for bit). No request may be unfinished."""
    if self.has_unfinished():
      raise RuntimeError("reset_state() with requests unfinished; abort them first")
    self.pool = PagePool(self.pool.num_pages, self.pool.page_size)
    s = self.scheduler
    self.scheduler = Scheduler(self.pool, s.max_num_batched_tokens, s.max_num_seqs,
                               s.prefix_caching)
    self.scheduler.preemptions = s.preemptions

  def generate(self, prompts: list, options: list[SamplingOptions]) -> list[RequestOutput]:
    """Runs the prompts (each with its options) to completion: one RequestOutput each,
    in order, holding each sample's whole output (offline use: RL rollouts, evaluation,
    benchmarks)."""
    ids = [self.add_request(p, o) for p, o in zip(prompts, options, strict=True)]
    done: dict[str, RequestOutput] = {}
    while self.has_unfinished():
      for out in self.step():
        whole = done.setdefault(out.request_id, out)
        if whole is not out:
          for total, new in zip(whole.outputs, out.outputs):
            total.token_ids = total.token_ids + new.token_ids
            total.text += new.text
            total.logprobs = total.logprobs + new.logprobs
            total.finish_reason, total.stop_reason = new.finish_reason, new.stop_reason
            total.stop_logprob = new.stop_logprob
            total.spec_steps, total.spec_draft_tokens = new.spec_steps, new.spec_draft_tokens
            total.spec_accepted_tokens = new.spec_accepted_tokens
          whole.finished = out.finished
    return [done[i] for i in ids]

  def reset_prefix_cache(self) -> int:
    """Forgets every cached prefix (after new weights, or between benchmark runs);
    returns how many pages' keys were dropped. Running requests keep their pages."""
    return self.pool.reset_cache()

  def has_unfinished(self) -> bool:
    return bool(self.scheduler.waiting or self.scheduler.running or self._siblings)

  # ----------------------------------------------------------------- the step

  def step(self) -> list[RequestOutput]:
    """Runs one engine step; returns each request's gain (finished ones last time)."""
    batch = self.scheduler.schedule(self._lookahead if self.proposer is not None else None)
    if not batch:
      return []
    inputs, rows, samplers = self._lay_out(batch)
    # speculating rows: {id(seq): (sampling row, drafts)}, drafts = tokens run after the
    # pending one (the scheduler counted them in n)
    spec_rows = {id(seq): (row, n - seq.remaining_prefill)
                 for row, (seq, n) in enumerate(samplers) if n > seq.remaining_prefill}
    if self.proposer is not None:
      drafts, q = self.proposer.propose(batch, spec_rows, rows,
                                        self.speculative.num_speculative_tokens)
      self._lay_out_drafts(inputs, rows, samplers, spec_rows, drafts, q)
    forks = self._fork(samplers, rows)
    counts = seen = allowed = None
    if any(seq.options.uses_penalties for seq, _ in samplers):
      counts, seen = self._penalty_arrays(samplers)
    if any(seq.matcher is not None for seq, _ in samplers):
      allowed = np.ones((self.runner.max_num_seqs, self.vocab_size), bool)
      for row, (seq, _) in enumerate(samplers):
        if seq.matcher is not None:
          allowed[row] = seq.matcher.allowed()
    out = self.runner.run(inputs, rows, counts, seen, allowed)
    if self.proposer is None:  # one token per row
      tokens, logprobs, top, top_ids = (x[:, None] for x in out)
      emitted = np.ones(len(tokens), np.int32)
    else:
      tokens, emitted, logprobs, top, top_ids = out
    self.counters["steps"] += 1
    self.counters["batched_tokens"] += sum(n for _, n in batch)
    changed: dict[str, None] = {}
    for seq, n in batch:
      if id(seq) in spec_rows:  # its pending token and the drafts accepted
        row, k = spec_rows[id(seq)]
        n = int(emitted[row])
        seq.spec_steps += 1
        seq.spec_draft_tokens += k
        seq.spec_accepted_tokens += n - 1
        self.counters["spec_decode_num_drafts"] += 1
        self.counters["spec_decode_num_draft_tokens"] += k
        self.counters["spec_decode_num_accepted_tokens"] += n - 1
      seq.computed += n
      seq.draft_computed = min(seq.draft_computed, seq.computed)
      if id(seq) not in spec_rows:  # (its accepted drafts are not among its tokens yet)
        self.scheduler.commit_full_pages(seq)
      changed[seq.request_id] = None
      if seq.computed >= len(seq.prompt) and seq.request_id in self._siblings:
        for sibling in self._siblings.pop(seq.request_id):
          self.scheduler.add(sibling)
    if forks:
      self._place_forks(forks)
    now = time.monotonic()
    for row, (seq, _) in enumerate(samplers):
      for j in range(int(emitted[row])):
        if seq.status is Status.FINISHED:
          break
        self._append(seq, int(tokens[row, j]), float(logprobs[row, j]), top[row, j],
                     top_ids[row, j], now)
      if id(seq) in spec_rows and seq.status is not Status.FINISHED:
        self.scheduler.commit_full_pages(seq)
    return [self._output(rid) for rid in changed if rid in self._requests]

  def _lay_out(self, batch):
    """The step's flat token batch, page tables and per-row sampling settings."""
    total = sum(n for _, n in batch)
    inputs, rows = self.runner.empty_inputs(self.runner.bucket(total))
    samplers = []
    t = 0
    inputs["num_seqs"][0] = len(batch)
    for row, (seq, n) in enumerate(batch):
      tokens = seq.tokens
      positions = np.arange(seq.computed, seq.computed + n)
      have = tokens[seq.computed:seq.computed + n]  # (a speculating row's drafts follow)
      inputs["tokens"][t:t + len(have)] = have
      inputs["positions"][t:t + n] = positions
      inputs["page"][t:t + n] = np.asarray(seq.pages)[positions // self.pool.page_size]
      inputs["slot"][t:t + n] = positions % self.pool.page_size
      inputs["page_table"][row, :len(seq.pages)] = seq.pages
      inputs["kv_lens"][row] = seq.computed + n
      inputs["adapter"][t:t + n] = seq.adapter
      t += n
      inputs["cu_q_lens"][row + 1:] = t
      if seq.computed + n >= len(tokens):  # its last token runs: sample the next one
        o = seq.options
        rows["sample_index"][len(samplers)] = t - 1
        for name, value in (("temperature", o.temperature), ("top_k", o.top_k),
                            ("top_p", o.top_p), ("min_p", o.min_p),
                            ("repetition", o.repetition_penalty),
                            ("presence", o.presence_penalty),
                            ("frequency", o.frequency_penalty),
                            ("seed", seq.seed % 2**32), ("draw", len(seq.output)),
                            ("top_logprobs", o.logprobs or 0),
                            ("scaled_logprobs", o.scaled_logprobs)):
          rows[name][len(samplers)] = value
        samplers.append((seq, n))
    return inputs, rows, samplers

  def _lookahead(self, seq: Sequence, budget: int) -> int:
    """How many draft tokens a decoding sequence carries in this step (the scheduler's
    hook): none when it does not speculate, is about to fork its siblings, or is at its
    last token; never past max_tokens or max_model_len."""
    if not seq.speculates or (not seq.output and seq.request_id in self._siblings):
      return 0
    k = min(self.speculative.num_speculative_tokens, budget,
            seq.options.max_tokens - len(seq.output) - 1,
            self.max_model_len - len(seq.tokens) - 1)
    return self.proposer.lookahead(seq, k) if k > 0 else 0

  def _lay_out_drafts(self, inputs, rows, samplers, spec_rows, drafts, q) -> None:
    """Each sampling row's window (the flat positions whose logits it verifies: its
    pending token's, then its drafts'), the drafts into the token batch, and q."""
    for row, (seq, _) in enumerate(samplers):
      k = spec_rows[id(seq)][1] if id(seq) in spec_rows else 0
      end = rows["sample_index"][row] + 1  # past its last token in the flat batch
      last = end - 1 - k  # its pending token
      if k:
        inputs["tokens"][last + 1:end] = drafts[id(seq)]
        rows["drafts"][row, :k] = drafts[id(seq)]
      rows["n_drafts"][row] = k
      rows["window"][row] = last + np.minimum(np.arange(rows["window"].shape[1]), k)
    if q is not None:
      rows["draft_probs"] = q

  def _fork(self, samplers, rows) -> list[tuple[Sequence, Sequence]]:
    """The samples 2..n of requests whose first sample reaches the end of its prompt in
    this step, as many as there are rows and pages for: each gets a sampling row reading
    the same position (its own key), so its prompt is never run again. Returns
    (first, sibling) pairs, for _place_forks once the step has written the prompt."""
    forks = []
    free_rows = self.runner.max_num_seqs - len(self.scheduler.running)
    free_pages = self.pool.available
    for first_row, (seq, _) in enumerate(list(samplers)):
      siblings = self._siblings.get(seq.request_id)
      if not siblings or seq.output:  # (sampling its first token: its prompt ends here)
        continue
      partial = len(seq.prompt) % self.pool.page_size > 0  # its last page is copied
      k = min(len(siblings), free_rows, free_pages if partial else len(siblings))
      free_pages -= k * partial
      for sibling in siblings[:k]:
        row = len(samplers)
        for name in rows:  # the first's settings and position; the sibling's own key
          if name != "draft_probs":  # (a device array; the first row carries no drafts)
            rows[name][row] = rows[name][first_row]
        rows["draw"][row] = 0
        rows["seed"][row] = sibling.seed % 2**32
        samplers.append((sibling, 0))
        forks.append((seq, sibling))
      del siblings[:k]
      if not siblings:
        del self._siblings[seq.request_id]
      free_rows -= k
    return forks

  def _place_forks(self, forks) -> None:
    """Gives each forked sample its first sample's prompt pages: the full ones shared
    (retained), the partial last one copied into a page of its own; it runs from there."""
    size, copies = self.pool.page_size, []
    for first, sibling in forks:
      full = len(first.prompt) // size
      for page in first.pages[:full]:
        self.pool.retain(page)
      sibling.pages = first.pages[:full]
      if len(first.prompt) % size:
        (page,) = self.pool.allocate(1)
        copies.append((first.pages[full], page))
        sibling.pages = sibling.pages + [page]
      sibling.computed, sibling.committed_pages = len(first.prompt), first.committed_pages
      sibling.draft_computed = first.draft_computed
      sibling.page_keys = list(first.page_keys[:full])
      self.scheduler.admit(sibling)
    self.counters["forked_samples"] += len(forks)
    if copies:
      self.runner.copy_pages(copies)
      if self.proposer is not None:
        self.proposer.copy_pages(copies)

  def _penalty_arrays(self, samplers):
    s, v = self.runner.max_num_seqs, self.vocab_size
    counts, seen = np.zeros((s, v), np.int32), np.zeros((s, v), bool)
    for row, (seq, _) in enumerate(samplers):
      np.add.at(counts[row], seq.output, 1)
      seen[row, seq.tokens] = True
    return counts, seen

  def _append(self, seq: Sequence, token: int, logprob: float, top, top_ids, now: float):
    o = seq.options
    if not seq.output:
      seq.first_token_time = now
      self.latencies["ttft"].append(now - seq.arrival)
    else:
      self.latencies["itl"].append(now - seq.last_token_time)
    seq.last_token_time = now
    self.counters["generation_tokens"] += 1
    if token in o.stop_token_ids or (not o.ignore_eos and token in self.stop_ids):
      seq.stop_reason = token
      seq.stop_logprob = logprob if o.logprobs is not None else None
      return self._finish(seq, "stop")
    seq.output.append(token)
    if seq.matcher is not None:
      seq.matcher.accept(token)
    if o.logprobs is not None:
      seq.logprobs.append({"token": token, "logprob": logprob,
                           "top": [(int(i), float(x)) for i, x in
                                   zip(top_ids[:o.logprobs], top[:o.logprobs])]})
    if self.tokenizer is not None:
      text = self.tokenizer.decode(seq.output)
      cut = min((i for i in (text.find(s) for s in o.stop) if i >= 0), default=-1)
      if cut >= 0:
        seq.text = text[:cut]
        seq.stop_reason = next(s for s in o.stop if text.find(s) == cut)
        return self._finish(seq, "stop")
      held = max((len(s) - 1 for s in o.stop), default=0)  # could still grow into a stop
      seq.text = text[:len(text) - held] if held else text
    grammar_done = seq.matcher is not None and seq.matcher.done
    if grammar_done or len(seq.output) >= o.max_tokens or len(seq.tokens) >= self.max_model_len:
      if self.tokenizer is not None:
        seq.text = self.tokenizer.decode(seq.output)
      self._finish(seq, "stop" if grammar_done else "length")

  def _finish(self, seq: Sequence, reason: str) -> None:
    self.scheduler.finish(seq, reason)
    self.counters["finished"] += 1

  def _output(self, request_id: str) -> RequestOutput:
    seqs = self._requests[request_id]
    outs = []
    for seq in seqs:
      new_ids, new_lp = seq.output[seq.sent_ids:], seq.logprobs[seq.sent_logprobs:]
      seq.sent_ids, seq.sent_logprobs = len(seq.output), len(seq.logprobs)
      text, seq.sent = seq.text[seq.sent:], len(seq.text)
      outs.append(SampleOutput(seq.sample, new_ids, text, new_lp, seq.finish_reason,
                               seq.stop_reason, seq.stop_logprob, seq.spec_steps,
                               seq.spec_draft_tokens, seq.spec_accepted_tokens))
    finished = all(s.status is Status.FINISHED for s in seqs)
    if finished:
      del self._requests[request_id]
    return RequestOutput(request_id, seqs[0].prompt, outs, finished)

  # ----------------------------------------------------------------- metrics

  def metrics(self) -> dict:
    """Counters and gauges for a server to export."""
    return {**self.counters, "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting), "pages_total": self.pool.num_pages - 1,
            "pages_used": self.pool.used, "pages_cached": self.pool.cached,
            "prefix_cache_hit_rate": self.pool.hit_rate,
            "prefix_cache_queried_tokens": self.pool.queried_tokens,
            "prefix_cache_hit_tokens": self.pool.hit_tokens,
            "preemptions": self.scheduler.preemptions, "evictions": self.pool.evictions}


def _recent_latencies() -> dict[str, collections.deque]:
  """The latest time-to-first-token and inter-token latencies, seconds (bounded: a
  long-running server's memory stays flat)."""
  return dict(ttft=collections.deque(maxlen=100_000), itl=collections.deque(maxlen=100_000))


def _memory_left(params) -> float:
  """Bytes of device memory not held by the weights (host memory on a CPU)."""
  import os

  import jax
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  return max(total - weights, 0) if math.isfinite(total) else 0.0
