"""A request to the engine: its prompt, its own sampling settings, and its state as the
scheduler moves it (waiting -> running -> finished, and back to waiting when preempted).
"""

from __future__ import annotations

import dataclasses
import enum
import math

from llm.config import check_range
from llm.inference.sampling import MAX_TOP_LOGPROBS, check_sampling


MAX_N = 128  # samples of one prompt


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """One request's sampling (OpenAI's and vLLM's names and defaults)."""
  max_tokens: int = 16
  temperature: float = 1.0  # 0: greedy
  top_p: float = 1.0  # 1: off
  top_k: int = 0  # 0: off
  min_p: float = 0.0  # 0: off
  repetition_penalty: float = 1.0  # 1: off; over prompt and output tokens
  presence_penalty: float = 0.0  # 0: off; over output tokens
  frequency_penalty: float = 0.0
  seed: int | None = None  # a seeded request's tokens do not depend on the batch
  stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  n: int = 1  # samples of the prompt, sharing its KV pages
  logprobs: int | None = None  # None: none; k: the sampled token's and the top k
  scaled_logprobs: bool = False  # log-probabilities of logits / temperature (as RL scores)
  grammar: str | None = None  # structured output: a spec of llm.serve.structured

  def __post_init__(self):
    check_range("max_tokens", self.max_tokens, lo=1)
    check_sampling(self)
    check_range("presence_penalty", self.presence_penalty, lo=-2, hi=2)
    check_range("frequency_penalty", self.frequency_penalty, lo=-2, hi=2)
    check_range("n", self.n, lo=1, hi=MAX_N)
    if self.seed is not None:
      check_range("seed", self.seed, lo=0)
    if self.logprobs is not None:
      check_range("logprobs", self.logprobs, lo=0, hi=MAX_TOP_LOGPROBS)
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")

  @property
  def uses_penalties(self) -> bool:
    return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0)


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass
class Sequence:
  """One sample of a request as the scheduler sees it: its tokens so far (prompt, then
  output), how many of them have K/V in its pages, and the pages (page table)."""
  request_id: str
  prompt: list[int]
  options: SamplingOptions
  seed: int  # the request's seed (or one drawn for it), plus the sample's index
  arrival: float
  output: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[dict] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  computed: int = 0  # tokens whose K/V are in the pages
  committed_pages: int = 0  # leading pages offered to the prefix cache
  page_keys: list[bytes] = dataclasses.field(default_factory=list)  # of its full pages so far
  matcher: object = None  # its grammar's state (llm.serve.structured.Matcher), if any
  adapter: int = 0  # its LoRA adapter's slot (llm.serve.lora; 0: the base model)
  status: Status = Status.WAITING
  finish_reason: str | None = None  # "stop" | "length" | "abort"
  stop_reason: int | str | None = None  # the stop token id or string that ended it
  stop_logprob: float | None = None  # the stop token's log-probability (with `logprobs`)
  text: str = ""  # the output decoded, up to what may be shown (stop strings held back)
  sent: int = 0  # characters of `text` already handed out
  sent_ids: int = 0  # output tokens already handed out
  sent_logprobs: int = 0
  first_token_time: float = math.nan
  last_token_time: float = math.nan
  admitted: int = 0  # the order of the latest admission (preemption takes the newest)
  sample: int = 0  # its index among the request's n
  # speculative decoding (llm.serve.speculative)
  speculates: bool = False  # its rows carry drafts (no penalties, no grammar)
  drafts: list[int] = dataclasses.field(default_factory=list)  # the step's proposal
  draft_computed: int = 0  # tokens whose K/V the draft model has in its pages
  spec_steps: int = 0  # verification steps that carried drafts
  spec_draft_tokens: int = 0  # draft tokens proposed
  spec_accepted_tokens: int = 0  # and accepted

  @property
  def tokens(self) -> list[int]:
    return self.prompt + self.output

  @property
  def remaining_prefill(self) -> int:
    """Tokens still to run before the next token can be sampled."""
    return len(self.tokens) - self.computed
