"""Evaluation: log-likelihoods against unbatched forwards; bits per byte from real bytes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.data.tokenizer import Tokenizer
from llm import objectives
from llm.eval.scorer import Scorer
from llm.inference import Decoder, SamplingParams
from llm.model import make_model


def _model(config):
  model = make_model(config.model)
  params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, jax.tree.map(lambda x: x * 3.0 if x.ndim > 2 else x, params)


def test_loglikelihood_matches_unbatched_forward(config, tokenizer_path):
  model, params = _model(config)
  tok = Tokenizer(tokenizer_path)
  scorer = Scorer(config.model, params, tok, max_len=64, batch_size=3)
  rng = np.random.default_rng(0)
  pairs = [(list(rng.integers(3, 512, n)), list(rng.integers(3, 512, m)))
           for n, m in ((4, 3), (9, 1), (2, 6), (7, 2))]
  got = scorer.loglikelihood_ids(pairs)
  for (ctx, cont), (lp, _) in zip(pairs, got):
    seq = ctx + cont
    logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([seq[:-1]]))[0], -1),
                      np.float64)
    want = sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))
    assert abs(lp - want) < 1e-4


def test_greedy_flag_and_multiple_choice(config, tokenizer_path):
  _, params = _model(config)
  tok = Tokenizer(tokenizer_path)
  ctx = [tok.bos_id] + list(tok.encode("def f(x):"))
  greedy = Decoder(config.model, params).generate([ctx], 4, SamplingParams(temperature=0.0))[0]
  other = [(t + 1) % 512 for t in greedy]
  scorer = Scorer(config.model, params, tok, max_len=64)
  (lp_g, is_g), (lp_o, is_o) = scorer.loglikelihood_ids([(ctx, greedy), (ctx, other)])
  assert is_g and not is_o and lp_g > lp_o
  choices = [" return x", " pass", " x = 1; return x + 1"]
  scores = [lp for lp, _ in scorer.loglikelihood([("def f(x):", c) for c in choices])]
  assert scorer.multiple_choice("def f(x):", choices) == int(np.argmax(scores))
  per_byte = [s / len(c.encode()) for s, c in zip(scores, choices)]
  assert scorer.multiple_choice("def f(x):", choices, normalize=True) == int(np.argmax(per_byte))


def test_byte_lengths_count_the_text(tokenizer_path):
  tok = Tokenizer(tokenizer_path)
  text = "for i in range(10):\n    print(i)  # ünïcode €"
  ids = tok.encode(text)
  # sentencepiece prepends one dummy-prefix space to the first piece.
  assert tok.token_byte_lengths()[ids].sum() == len(text.encode()) + 1


def test_heldout_metrics_are_consistent(config, tmp_path, tokenizer_path):
  _, params = _model(config)
  tok = Tokenizer(tokenizer_path)
  r = objectives.heldout(config, params, tok, tmp_path, batch_size=4, max_batches=2)
  assert r["tokens"] > 0 and r["bytes"] > r["tokens"]
  assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
  assert math.isclose(r["bits_per_byte"], r["loss"] * r["tokens"] / math.log(2) / r["bytes"],
                      rel_tol=1e-6)
  assert r["rows"] == 8 and r["val_rows"] > 8  # which rows it read, said


def test_scoring_and_perplexity_refuse_data_that_do_not_fit(config, tmp_path):
  import json

  import pytest

  from llm.eval.tasks import read_examples
  config.train.update(objective="grpo")
  with pytest.raises(ValueError, match=r"is a train.objective='grpo' run, which llm.evaluate does "
                                       r"not measure \(it measures pretrain, sft, distill, orpo, "
                                       r"simpo, reward runs\)"):
    objectives.heldout(config, None, None, tmp_path)
  (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "no chat here"}) + "\n")
  with pytest.raises(ValueError, match=r"plain.jsonl:1: keys \['text'\] match no chat format"):
    read_examples(tmp_path / "plain.jsonl")
  (tmp_path / "open.jsonl").write_text(json.dumps({"messages": [
      {"role": "user", "content": "2+2?"}]}) + "\n")
  with pytest.raises(ValueError, match=r"open.jsonl:1: a scored example is a chat whose last "
                                       r"message is the assistant's answer"):
    read_examples(tmp_path / "open.jsonl")
