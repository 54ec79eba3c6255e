"""Speculative decoding in the serving engine (llm.serve.speculative): greedy tokens and
their log-probabilities equal plain decoding's on a small page pool (chunked prefill,
shared prefixes, preemption), with prompt lookup and with draft models; sampled tokens
follow the target's exact distribution (a chi-square test against the model's own
conditionals, on a 4-token vocabulary); bad settings are refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llm.model import init_params, make_model, unbox
from llm.serve.engine import Engine
from llm.serve.request import SamplingOptions
from llm.serve.speculative import SpeculativeConfig, lookup_ngram
from tests.helpers import tiny_config


def _model(vocab: int, n_layers: int, seed: int):
  cfg = tiny_config()
  cfg.model.update(vocab_size=vocab, n_layers=n_layers)
  params = unbox(init_params(make_model(cfg.model), jax.random.key(seed), 8))
  # sharper logits than at init: greedy ties cannot hide a bug, and distributions differ
  return cfg.model, jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)


def _run(model_cfg, params, prompts, options, max_steps=400, **kw):
  """Every request to the end (within max_steps: a scheduler that deadlocks fails);
  (outputs in order, engine)."""
  kw = {**dict(page_size=4, num_pages=40, max_num_batched_tokens=24, max_num_seqs=6,
               max_model_len=96, buckets=(8, 24), warm_up=False), **kw}
  engine = Engine(model_cfg, params, **kw)
  ids = [engine.add_request(p, o) for p, o in zip(prompts, options)]
  got = {}
  for _ in range(max_steps):
    if not engine.has_unfinished():
      break
    for out in engine.step():
      whole = got.setdefault(out.request_id, out)
      if whole is not out:
        whole.outputs[0].token_ids += out.outputs[0].token_ids
        whole.outputs[0].logprobs += out.outputs[0].logprobs
        whole.outputs[0].spec_steps = out.outputs[0].spec_steps
        whole.outputs[0].spec_draft_tokens = out.outputs[0].spec_draft_tokens
        whole.outputs[0].spec_accepted_tokens = out.outputs[0].spec_accepted_tokens
  assert not engine.has_unfinished(), "the engine did not finish"
  assert engine.metrics()["pages_used"] == 0
  engine.pool.check()
  return [got[i].outputs[0] for i in ids], engine


def test_prompt_lookup_finds_the_latest_longest_match():
  assert lookup_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 3, 1) == [7, 8]
  assert lookup_ngram([5, 1, 2, 6, 2], 3, 3, 1) == [6, 2]  # n=1: after the latest 2
  assert lookup_ngram([5, 1, 2, 6, 2], 3, 3, 2) == []  # no 2-gram recurs
  assert lookup_ngram([4, 4, 4], 5, 2, 1) == [4]  # what follows, up to the end


@pytest.mark.parametrize("draft", ["ngram", "other model", "itself"])
def test_greedy_speculation_equals_plain_decoding(draft):
  """Greedy requests (and one with a repetition penalty, which never speculates) give
  the same tokens and log-probabilities with speculation as without, on a pool small
  enough to preempt. A draft model that is the target itself is always accepted."""
  vocab = 64  # small: the random model's greedy outputs repeat, so lookups find drafts
  model_cfg, params = _model(vocab, 2, 0)
  rng = np.random.default_rng(0)
  system = rng.integers(1, vocab, 9).tolist()
  prompts = [(system if i % 3 == 0 else []) + rng.integers(1, vocab, int(rng.integers(3, 14))).tolist()
             for i in range(9)]
  options = [SamplingOptions(max_tokens=int(24 + 2 * i), temperature=0.0, ignore_eos=True,
                             logprobs=0, repetition_penalty=1.3 if i == 4 else 1.0)
             for i in range(len(prompts))]
  plain, plain_engine = _run(model_cfg, params, prompts, options)
  assert plain_engine.metrics()["preemptions"] > 0
  draft_model = {"ngram": None, "other model": _model(vocab, 1, 1),
                 "itself": (model_cfg, params)}[draft]
  config = SpeculativeConfig("ngram" if draft == "ngram" else "draft", 3, prompt_lookup_min=1)
  spec, engine = _run(model_cfg, params, prompts, options, speculative=config,
                      draft_model=draft_model)
  for a, b in zip(spec, plain):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose([x["logprob"] for x in a.logprobs],
                               [x["logprob"] for x in b.logprobs], atol=2e-5)
  m = engine.metrics()
  assert spec[4].spec_steps == 0 and m["spec_decode_num_drafts"] > 0
  assert engine.counters["steps"] < plain_engine.counters["steps"] or draft == "other model"
  assert m["spec_decode_num_draft_tokens"] == sum(s.spec_draft_tokens for s in spec)
  assert m["spec_decode_num_accepted_tokens"] == sum(s.spec_accepted_tokens for s in spec)
  if draft == "itself":
    assert m["spec_decode_num_accepted_tokens"] == m["spec_decode_num_draft_tokens"]
    assert spec[0].acceptance_rate == 1.0 and spec[0].mean_accepted_length > 3.0
  else:
    assert 0 < m["spec_decode_num_accepted_tokens"] < m["spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_speculation_follows_the_target_distribution(method):
  """16 x 128 samples of 3 tokens at temperature 0.9, top-k 3, over a 4-token vocabulary
  (the second and third drawn through drafts: accepted, rejected and resampled from the
  residual, or the bonus) against the target's exact joint distribution, from full
  forward passes: a chi-square test at p = 0.001 over the cells expected 5+ times."""
  vocab, temperature, top_k = 4, 0.9, 3
  model_cfg, params = _model(vocab, 2, 2)
  prompt = [1, 3, 0, 2, 2, 1, 3]
  # the exact conditionals: one forward of every prompt + t1 + t2
  pairs = [(a, b) for a in range(vocab) for b in range(vocab)]
  logits = make_model(model_cfg).apply(
      {"params": params}, jnp.asarray([prompt + list(p) for p in pairs]))
  logits = np.asarray(logits[:, len(prompt) - 1:], np.float64) / temperature

  def probs(x):
    x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    e = np.exp(x - x.max())
    return e / e.sum()

  expected = {}
  for i, (a, b) in enumerate(pairs):
    p1, p2, p3 = probs(logits[i, 0]), probs(logits[i, 1]), probs(logits[i, 2])
    for c in range(vocab):
      expected[a, b, c] = p1[a] * p2[b] * p3[c]
  draft_model = _model(vocab, 1, 3) if method == "draft" else None
  options = [SamplingOptions(max_tokens=3, temperature=temperature, top_k=top_k, n=128,
                             seed=1000 * i, ignore_eos=True) for i in range(16)]
  engine = Engine(model_cfg, params, page_size=4, num_pages=400, max_num_batched_tokens=256,
                  max_num_seqs=64, max_model_len=16, buckets=(64, 256), warm_up=False,
                  speculative=SpeculativeConfig(method, 2, prompt_lookup_min=1),
                  draft_model=draft_model)
  outs = engine.generate([prompt] * len(options), options)
  drawn = [tuple(s.token_ids) for out in outs for s in out.outputs]
  m = engine.metrics()
  assert 0 < m["spec_decode_num_accepted_tokens"] < m["spec_decode_num_draft_tokens"]
  assert all(expected[d] > 0 for d in drawn)  # nothing outside each position's top 3
  cells = sorted(expected, key=expected.get, reverse=True)
  big = [c for c in cells if expected[c] * len(drawn) >= 5]
  observed = [sum(d == c for d in drawn) for c in big] + [sum(d not in big for d in drawn)]
  exp = [expected[c] for c in big] + [1 - sum(expected[c] for c in big)]
  chi2 = sum((o - len(drawn) * e) ** 2 / (len(drawn) * e) for o, e in zip(observed, exp)
             if e > 0)
  critical = stats.chi2.ppf(0.999, len(big) - (sum(exp[-1:]) <= 0))
  assert chi2 < critical, (chi2, critical)


def test_bad_speculative_settings_are_refused():
  with pytest.raises(ValueError, match="speculative method='medusa'; allowed: ngram, draft"):
    SpeculativeConfig("medusa")
  with pytest.raises(ValueError, match="num_speculative_tokens"):
    SpeculativeConfig("ngram", 0)
  with pytest.raises(ValueError, match="prompt_lookup_max"):
    SpeculativeConfig("ngram", prompt_lookup_max=1, prompt_lookup_min=3)
  with pytest.raises(ValueError, match="draft_workdir is for method='draft'"):
    SpeculativeConfig("ngram", draft_workdir="/tmp")
  model_cfg, params = _model(64, 1, 0)
  with pytest.raises(ValueError, match="needs draft_workdir"):
    Engine(model_cfg, params, num_pages=8, max_model_len=16, warm_up=False,
           speculative=SpeculativeConfig("draft"))
  with pytest.raises(ValueError, match="draft model's vocab_size=32 is not the served model's 64"):
    Engine(model_cfg, params, num_pages=8, max_model_len=16, warm_up=False,
           speculative=SpeculativeConfig("draft"), draft_model=_model(32, 1, 0))
