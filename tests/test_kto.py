"""KTO against TRL 1.16's own KTOTrainer._compute_loss (run on the same per-token
log-probabilities), unpaired data and its KL sequences, and a short run."""

import collections
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data import unpaired
from llm.objectives.kto import kto_loss
from tests.helpers import losses, tiny_config

torch = pytest.importorskip("torch")
kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")


def _tokenized(rng):
  out = []
  for n_prompt, n_completion, label in ((4, 3, True), (3, 5, False), (5, 2, True),
                                        (2, 4, False), (3, 3, False)):
    out.append((rng.integers(3, 500, n_prompt).astype(np.int32),
                rng.integers(3, 500, n_completion).astype(np.int32), label))
  return out


def _trl(tokenized, logp_of, ref_of, *, beta, loss_type, weights):
  """TRL's _compute_loss on padded (example, KL) batches whose model returns `logp_of`'s
  per-token log-probabilities (the reference's, precomputed, from `ref_of`)."""
  seqs = unpaired.sequences(tokenized, mismatched=True)
  width = max(len(ids) for s in seqs for ids, _, _ in s)

  def padded(which):
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, s in enumerate(seqs):
      x, mask, _ = s[which]
      ids[i, :len(x)] = torch.tensor(x)
      attention[i, :len(x)] = 1
      completion[i, :len(x)] = torch.tensor(mask.astype(np.int64))
    return ids, attention, completion

  main, kl = padded(0), padded(1)

  def per_token(table, which):  # [B, T - 1]: log p(token j + 1) on completion tokens
    out = torch.zeros(len(seqs), width - 1, dtype=torch.float64)
    for i, s in enumerate(seqs):
      x, mask, _ = s[which]
      values = table(i, which)
      out[i, :len(x) - 1] = torch.tensor(np.where(mask[1:], values, 0.0))
    return out

  def model(input_ids, **kwargs):
    which = 0 if torch.equal(input_ids, main[0]) else 1
    assert torch.equal(input_ids, (main, kl)[which][0])
    zeros = torch.zeros(len(seqs), width - 1)
    return SimpleNamespace(log_probs=per_token(logp_of, which), entropy=zeros,
                           mean_logits=zeros)

  batch = {"input_ids": main[0], "attention_mask": main[1], "completion_mask": main[2],
           "KL_input_ids": kl[0], "KL_attention_mask": kl[1], "KL_completion_mask": kl[2],
           "label": torch.tensor([t[2] for t in tokenized]),
           "ref_logps": per_token(ref_of, 0).sum(-1), "ref_KL_logps": per_token(ref_of, 1).sum(-1)}
  self = SimpleNamespace(
      model=SimpleNamespace(training=True),
      accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
      calculate_KL=loss_type == "kto", precompute_ref_logps=True, loss_type=loss_type,
      beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1],
      _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
      aux_loss_enabled=False)
  self._compute_kl_logps = lambda m, b: kto_trainer.KTOTrainer._compute_kl_logps(self, m, b)
  loss = kto_trainer.KTOTrainer._compute_loss(self, model, batch, return_outputs=False)
  return loss.item(), {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,weights", [("kto", (1.0, 1.0)), ("kto", (1.0, 1.33)),
                                               ("apo_zero_unpaired", (1.0, 1.0))])
def test_loss_and_metrics_are_trls(loss_type, weights):
  from llm.model import init_params, make_model, unbox
  from llm.training.reference import reference_logps
  cfg = tiny_config()
  cfg.train.objective = "kto"
  cfg.train.kto.update(beta=0.5, loss_type=loss_type, desirable_weight=weights[0],
                       undesirable_weight=weights[1])
  tokenized = _tokenized(np.random.default_rng(0))
  rows = unpaired.pack(tokenized, seq_len=64, mismatched=True)
  assert rows["inputs"].shape[0] == 1  # every example and KL sequence in one row
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  model = make_model(cfg.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  logp = np.asarray(reference_logps(params, batch, model=model, config=cfg), np.float64)
  ref = 1.2 * logp  # a reference unlike the policy (less sure of these tokens: KL > 0)
  batch["ref_logp"] = jnp.asarray(ref, jnp.float32)
  total, sums = kto_loss(params, batch, model=model, config=cfg)

  def table(values):  # (example, which sequence) -> its predictions, in order
    return lambda i, which: values[0][(rows["example_ids"][0] == i + 1)
                                      & (rows["kl"][0] == which)]

  trl_loss, trl_metrics = _trl(tokenized, table(logp), table(ref), beta=0.5,
                               loss_type=loss_type, weights=weights)
  weight = float(sums["weight"])
  assert weight == 5
  np.testing.assert_allclose(float(total) / weight, trl_loss, rtol=1e-5)
  if loss_type == "kto":
    assert trl_metrics["kl"] > 0
  for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected"):
    expected = trl_metrics.get(name, 0.0)
    np.testing.assert_allclose(float(sums[name]) / weight, expected, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_pairs_are_unpaired_and_kl_sequences_borrow_the_previous_completion(tmp_path,
                                                                           tokenizer_path):
  from llm.data.tokenizer import open_tokenizer
  record = {"prompt": "q", "chosen": "yes", "rejected": "no"}
  (_, good, yes), (_, bad, no) = unpaired.to_examples(record)
  assert yes and not no and good[-1]["content"] == "yes" and bad[-1]["content"] == "no"
  with pytest.raises(ValueError, match="'label' must be true"):
    unpaired.to_examples({"prompt": "q", "completion": "a", "label": "yes"}, "x.jsonl:3")
  with pytest.raises(ValueError, match=r"x.jsonl:1: an unpaired example has 'prompt', "
                                       r"'completion' and 'label'"):
    unpaired.to_examples({"prompt": "q"}, "x.jsonl:1")
  rng = np.random.default_rng(1)
  tokenized = _tokenized(rng)
  seqs = unpaired.sequences(tokenized, mismatched=True)
  for i, ((ids, mask, kl0), (kl_ids, kl_mask, kl1)) in enumerate(seqs):
    prompt, completion, _ = tokenized[i]
    np.testing.assert_array_equal(ids, np.r_[prompt, completion])
    np.testing.assert_array_equal(kl_ids, np.r_[prompt, tokenized[i - 1][1]])
    assert mask.sum() == len(completion) and kl_mask.sum() == len(tokenized[i - 1][1])
    assert (kl0, kl1) == (0, 1)
  rows = [{"prompt": f"q{i}", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)}
          for i in range(10)]
  (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = tiny_config()
  c.data.update(paths=str(tmp_path / "u.jsonl"), tokenizer_path=tokenizer_path, seq_len=64,
                val_fraction=0.2)
  c.data.chat.template = "mistral"
  c.train.objective = "kto"
  corpus = unpaired.UnpairedExamples().read(c, tmp_path, open_tokenizer(tokenizer_path))
  train_rows = corpus.train.rows
  assert int(train_rows["example_ids"].max(axis=1).sum()) == 8
  assert set(np.unique(train_rows["kl"])) == {0, 1}


def test_a_short_run_separates_desirable_from_undesirable(config, tmp_path):
  rng = np.random.default_rng(0)
  with open(tmp_path / "pairs.jsonl", "w") as f:  # pairs, made unpaired by the reader
    for _ in range(100):
      word = "".join(rng.choice(list("abcdefgh"), 4))
      f.write(json.dumps({"prompt": f"Is {word} a word?", "chosen": "yes",
                          "rejected": "no"}) + "\n")
  config.train.update(objective="kto", steps=12, eval_every=12, checkpoint_every=12,
                      log_every=1, eval_batches=2)
  config.data.update(source="jsonl", paths=str(tmp_path / "pairs.jsonl"), seq_len=128,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=2)
  from llm.train import train
  last = train(config, tmp_path / "run", devices=jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  first = next(r for r in records if r.get("step") == 1)
  assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)  # at the reference
  assert last["eval_rewards/margins"] > 0
  assert losses(tmp_path / "run")[12] < losses(tmp_path / "run")[1]
