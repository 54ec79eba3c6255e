"""An EleutherAI lm-evaluation-harness model backed by a workdir (`pip install lm_eval`).

  import lm_eval
  from llm.eval.lm_eval_adapter import WorkdirLM
  lm_eval.simple_evaluate(model=WorkdirLM("runs/tiny"), tasks=["my_task"],
                          task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))
"""

from __future__ import annotations

from lm_eval.api.model import LM

from llm.eval.scorer import Scorer
from llm.inference import Decoder, SamplingParams, load


class WorkdirLM(LM):
  """loglikelihood, loglikelihood_rolling and generate_until over our model and tokenizer."""

  def __init__(self, workdir: str, batch_size: int = 8, max_len: int | None = None):
    super().__init__()
    self.config, self.params, self.tok = load(workdir)
    self.max_len = max_len or self.config.data.seq_len
    self.scorer = Scorer(self.config.model, self.params, self.tok, self.max_len, batch_size)
    self.decoder = Decoder(self.config.model, self.params)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

  def loglikelihood_rolling(self, requests) -> list[float]:
    """Whole-text log-likelihood, scored in windows of max_len/2 tokens, each conditioned
    on up to max_len/2 preceding tokens (the first on BOS)."""
    out = []
    half = max(self.max_len // 2, 1)
    for r in requests:
      ids = (self.tok.bos_prefix() or [self.tok.eos_id]) + list(self.tok.encode(r.args[0]))
      pairs = [(ids[max(0, start - half):start], ids[start:start + half])
               for start in range(1, len(ids), half)]
      out.append(sum(lp for lp, _ in self.scorer.loglikelihood_ids(pairs)))
    return out

  def generate_until(self, requests) -> list[str]:
    out = []
    for r in requests:
      context, kwargs = r.args[0], dict(r.args[1])
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_tokens = int(kwargs.pop("max_gen_toks", 256))
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
      prompt = (self.tok.bos_prefix() or [self.tok.eos_id]) + list(self.tok.encode(context))
      prompt = prompt[-max(self.max_len - max_tokens, 1):]
      ids = self.decoder.generate([prompt], max_tokens, SamplingParams(temperature=temperature),
                                  eos_id=self.tok.eos_id)[0]
      text = self.tok.decode(ids)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out
