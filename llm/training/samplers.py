"""Samplers: how the trainer completes prompts with the policy it is training, for GRPO's
rounds (llm.training.rollouts) and on-policy distillation (llm.objectives.distill).
`train.sampler` chooses (SAMPLERS):

- "engine" (default): the serving engine (llm.serve.engine), in the trainer's process, on
  the training mesh. The whole round is one continuously batched workload: a completion
  that stops frees its row for the next, and the n samples of a prompt share the pages of
  its prompt (prefix sharing: the prompt runs once, its last partial page once per
  sample). It reads the trainer's params in place: an unscanned model's arrays are used as
  they are, sharded as training shards them (model.scan_layers=False: nothing is copied);
  a scanned model's layers are sliced out of their stack once per round, one copy of the
  layer weights, dropped when the round is done. The KV pages (enough for every row of a
  round at full length) are allocated once and held. Each sampled token comes with its
  log-probability under logits / temperature, what the trainer computes for it, so the
  two can be compared (GRPO's parity metrics) or the trainer's pass skipped
  (train.grpo.old_logps="sampler").
- "decoder": the static-batch KV-cache decoder (llm.inference.decoder): every row waits
  for the round's longest completion, each sample recomputes its prompt, and no
  log-probabilities come back. Kept as the reference the engine is measured against.

Both draw from keys fixed by their `seed` argument, so a round sampled again after a
resume, from the same params, is the same bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llm.inference.sampling import SamplingParams


@dataclasses.dataclass
class Completions:
  """Sampled completions, `n` per prompt in prompt order (TRL's repeat_interleave)."""
  ids: list[list[int]]  # each with the stop token that ended it, if one did
  logps: list[np.ndarray] | None  # the sampler's log-probability of each of those tokens


class EngineSampler:
  """Completes prompts with the serving engine (see the module docstring)."""

  has_logps = True

  def __init__(self, model_cfg, mesh, stop_ids, max_model_len: int, max_num_seqs: int,
               page_size: int = 16):
    self.model_cfg, self.mesh, self.stop = model_cfg, mesh, tuple(int(t) for t in stop_ids)
    self.max_model_len, self.max_num_seqs, self.page_size = max_model_len, max_num_seqs, page_size
    self.engine = None

  def _engine(self, params):
    if self.engine is None:  # built with the first params (their shapes compile it)
      from llm.serve.engine import Engine
      pages_per_seq = -(-self.max_model_len // self.page_size)
      tokens = max(256, self.max_num_seqs)
      # buckets in powers of two (each compiled when first used): a round's steps are
      # padded by at most 2x
      buckets = tuple(b for b in (2 ** i for i in range(4, 20)) if b < tokens) + (tokens,)
      self.engine = Engine(self.model_cfg, params, page_size=self.page_size,
                           num_pages=self.max_num_seqs * pages_per_seq + 1,
                           max_num_seqs=self.max_num_seqs, max_num_batched_tokens=tokens,
                           buckets=buckets, max_model_len=self.max_model_len, mesh=self.mesh,
                           warm_up=False)
    else:
      self.engine.set_params(params)
    self.engine.reset_state()
    return self.engine

  def generate(self, params, prompts: list[list[int]], n: int, max_tokens: int,
               sampling: SamplingParams, seed: int) -> Completions:
    from llm.serve.request import SamplingOptions
    engine = self._engine(params)
    seeds = np.random.SeedSequence([seed % 2**63]).generate_state(len(prompts))
    options = [SamplingOptions(max_tokens=max_tokens, temperature=sampling.temperature,
                               top_k=sampling.top_k, top_p=sampling.top_p, n=n,
                               seed=int(s), stop_token_ids=self.stop, logprobs=0,
                               scaled_logprobs=True) for s in seeds]
    try:
      outputs = engine.generate([list(map(int, p)) for p in prompts], options)
    finally:
      engine.set_params(None)  # the round's slices (scanned models) are not kept
    ids, logps = [], []
    for out in outputs:
      for sample in out.outputs:
        stopped = isinstance(sample.stop_reason, int)
        ids.append(list(sample.token_ids) + [sample.stop_reason] * stopped)
        logps.append(np.asarray([lp["logprob"] for lp in sample.logprobs]
                                + [sample.stop_logprob] * stopped, np.float32))
    return Completions(ids, logps)


class DecoderSampler:
  """Completes prompts with the static-batch decoder (see the module docstring)."""

  has_logps = False

  def __init__(self, model_cfg, mesh, stop_ids, max_model_len: int, max_num_seqs: int):
    del mesh, max_model_len
    from llm.inference.decoder import Decoder
    self.decoder, self.stop = Decoder(model_cfg, None), list(stop_ids)
    self.rows = max_num_seqs  # every batch padded to these rows: one compiled shape

  def generate(self, params, prompts: list[list[int]], n: int, max_tokens: int,
               sampling: SamplingParams, seed: int) -> Completions:
    rows = [list(map(int, p)) for p in prompts for _ in range(n)]
    ids: list[list[int]] = []
    self.decoder.params = params
    try:
      for i, start in enumerate(range(0, len(rows), self.rows)):
        chunk = rows[start:start + self.rows]
        padded = chunk + [chunk[-1]] * (self.rows - len(chunk))
        ids += self.decoder.generate(padded, max_tokens, sampling, seed=seed + i,
                                     eos_id=self.stop, keep_stop=True)[:len(chunk)]
    finally:
      self.decoder.params = None
    return Completions(ids, None)


# train.sampler -> how on-policy objectives complete prompts (see the module docstring)
SAMPLERS = {"engine": EngineSampler, "decoder": DecoderSampler}
