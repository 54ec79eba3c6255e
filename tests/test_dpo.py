"""DPO: the losses against TRL's formulas, per-pair sums against NumPy, preference
packing, and a short run whose held-out preference accuracy rises."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data import preference
from llm.train import train
from llm.objectives.dpo import dpo_losses
from llm.objectives.pairs import pair_sums
from tests.helpers import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _logps(seed, n=16):
  return [np.random.default_rng(seed + i).normal(-20, 5, n).astype(np.float32) for i in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_and_ipo_losses_are_trls(beta):
  pc, pr, rc, rr = _logps(0)
  h = torch.tensor((pc - pr) - (rc - rr))
  # TRL (DPOTrainer._compute_loss, reverse KL): sigmoid: -logsigmoid(beta * delta_score)
  ours = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
  np.testing.assert_allclose(ours, -F.logsigmoid(beta * h).numpy(), rtol=1e-5, atol=1e-6)
  # conservative DPO (label smoothing eps), TRL's pre-1.0 sigmoid form
  eps = 0.2
  ref = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
  np.testing.assert_allclose(dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="sigmoid",
                                        label_smoothing=eps), ref.numpy(), rtol=1e-5, atol=1e-6)
  # IPO: (per-token average log-ratio difference - 1 / (2 beta))^2
  nc, nr = np.arange(3, 19).astype(np.float32), np.arange(5, 21).astype(np.float32)
  ipo_delta = torch.tensor((pc - rc) / nc - (pr - rr) / nr)
  np.testing.assert_allclose(dpo_losses(pc / nc, pr / nr, rc / nc, rr / nr, beta=beta,
                                        loss_type="ipo"),
                             ((ipo_delta - 1 / (2 * beta)) ** 2).numpy(), rtol=1e-4, atol=1e-5)


def test_pairs_pack_into_rows_and_sum_per_side():
  ids = lambda n, start: np.arange(start, start + n, dtype=np.int32)  # noqa: E731
  mask = lambda n, k: np.r_[np.zeros(n - k, bool), np.ones(k, bool)]  # noqa: E731
  tokenized = [(ids(4, 10), mask(4, 2), ids(3, 20), mask(3, 1)),
               (ids(5, 30), mask(5, 3), ids(4, 40), mask(4, 2)),
               (ids(6, 50), mask(6, 2), ids(6, 60), mask(6, 2))]
  rows = preference.pack_pairs(tokenized, seq_len=12)
  # pair 1 (3 + 2 predictions) and pair 2 (4 + 3) fill row 0; pair 3 (5 + 5) row 1
  np.testing.assert_array_equal(rows["pair_ids"][0], [1] * 5 + [2] * 7)
  np.testing.assert_array_equal(rows["chosen"][0], [1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4])
  np.testing.assert_array_equal(rows["pair_ids"][1], [1] * 10 + [0] * 2)
  values = np.random.default_rng(0).normal(size=rows["inputs"].shape).astype(np.float32)
  sums = np.asarray(pair_sums(jnp.asarray(values), {k: jnp.asarray(v) for k, v in rows.items()}))
  for r in range(2):
    for p in range(1, 3):
      for side in (0, 1):
        sel = ((rows["pair_ids"][r] == p) & (rows["chosen"][r] == side)
               & (rows["loss_mask"][r] > 0))
        np.testing.assert_allclose(sums[r, p, side], values[r][sel].sum(), rtol=1e-5, atol=1e-6)


def test_formats_become_pairs():
  chosen, rejected = preference.to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
  assert chosen == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  assert rejected[-1]["content"] == "5"
  conv = [{"role": "user", "content": "q"}]
  chosen, _ = preference.to_pair({"prompt": conv, "chosen": [{"role": "assistant",
                                                              "content": "a"}],
                                  "rejected": [{"role": "assistant", "content": "b"}]})
  assert chosen == conv + [{"role": "assistant", "content": "a"}]
  with pytest.raises(ValueError, match="needs 'chosen' and 'rejected'"):
    preference.to_pair({"prompt": "x", "chosen": "y"})


def test_pairs_that_teach_nothing_are_refused_or_dropped_with_reasons(tmp_path, capsys,
                                                                       tokenizer_path):
  from llm.data.tokenizer import open_tokenizer
  from tests.helpers import tiny_config
  conv = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
  with pytest.raises(ValueError, match=r"ex: 'chosen' and 'rejected' are whole conversations "
                                       r"\(no 'prompt'\) whose prompts differ at message 0"):
    preference.to_pair({"chosen": conv(("user", "a?"), ("assistant", "x")),
                        "rejected": conv(("user", "b?"), ("assistant", "y"))}, "ex")
  with pytest.raises(ValueError, match="'margin' must be a finite number, got NaN"):
    preference._margin({"margin": float("nan")}, "ex")
  rows = [{"prompt": "q1", "chosen": "yes", "rejected": "yes"},  # identical
          {"prompt": "q2", "chosen": "  ", "rejected": "no"},  # empty completion
          {"prompt": "q3", "chosen": "yes", "rejected": ""},
          {"chosen": conv(("user", "q4"), ("assistant", "yes")),  # implicit prompt, fine
           "rejected": conv(("user", "q4"), ("assistant", "no"))}]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 5))
  c = tiny_config()
  c.data.update(paths=str(tmp_path / "p.jsonl"), tokenizer_path=tokenizer_path, val_fraction=0.2,
                seq_len=256)
  c.data.chat.template = "chatml"
  c.train.update(objective="dpo")
  train_rows = preference.PreferencePairs().read(c, tmp_path, open_tokenizer(tokenizer_path)).train
  out = capsys.readouterr().out
  assert "dropped 15; 10 an empty completion; 5 chosen identical to rejected" in out, out
  assert int(train_rows.rows["pair_ids"].max(axis=1).sum()) == 4  # the 4 good pairs


def _write_pairs(path, n, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      word = "".join(rng.choice(list("abcdefgh"), 4))
      # a preference a tiny model can pick up in a few steps: always answer "yes"
      f.write(json.dumps({"prompt": f"Is {word} a word?", "chosen": "yes",
                          "rejected": "no"}) + "\n")


def test_dpo_run_raises_held_out_preference_accuracy(config, tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl", 400)
  config.train.update(objective="dpo", steps=20, eval_every=20, checkpoint_every=20,
                      log_every=1, eval_batches=4)
  config.train.dpo.beta = 0.5
  config.data.update(source="jsonl", paths=str(tmp_path / "pairs.jsonl"), seq_len=96,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"  # (the test tokenizer spells <|im_start|> out)
  config.optim.update(lr=1e-2, warmup_steps=2)
  train(config, tmp_path / "run", devices=jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  first = next(r for r in records if r.get("step") == 1)
  # step 1 starts at the reference: DPO loss log 2, zero rewards
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-4)
  assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
  last = [r for r in records if "eval_rewards/accuracies" in r][-1]
  assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_loss"] < np.log(2)
  assert losses(tmp_path / "run")[20] < losses(tmp_path / "run")[1]


def test_rpo_term_and_ipo_metrics_follow_trl():
  """rpo_alpha adds TRL 1.16's "sft" term (loss_type=["sigmoid", "sft"]): the mean NLL over
  every chosen token of the batch, not a mean of per-pair means (the pairs here have 3 and
  5 chosen tokens). With loss_type="ipo" the logged rewards and logps are sums, as TRL
  logs them, while its loss compares per-token averages."""
  from llm.model import init_params, make_model, unbox
  from llm.objectives.dpo import dpo_loss as dpo
  from llm.training.reference import reference_logps
  from tests.helpers import tiny_config
  cfg = tiny_config()
  cfg.train.objective = "dpo"
  rng = np.random.default_rng(0)
  tokenized = [(rng.integers(3, 500, n).astype(np.int32), np.r_[np.zeros(n - k, bool),
                                                               np.ones(k, bool)],
                rng.integers(3, 500, m).astype(np.int32), np.r_[np.zeros(m - 2, bool),
                                                               np.ones(2, bool)])
               for n, k, m in ((6, 3, 5), (9, 5, 8))]
  batch = {k: jnp.asarray(v) for k, v in preference.pack_pairs(tokenized, seq_len=32).items()}
  model = make_model(cfg.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  logp = reference_logps(params, batch, model=model, config=cfg)
  batch["ref_logp"] = 0.9 * logp  # a reference unlike the policy
  plain, sums = dpo(params, batch, model=model, config=cfg)
  cfg.train.dpo.rpo_alpha = 0.5
  with_rpo, _ = dpo(params, batch, model=model, config=cfg)
  chosen = np.asarray(batch["loss_mask"][0] * batch["chosen"][0] * (batch["pair_ids"][0] > 0),
                      bool)
  # TRL: batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean(), weight rpo_alpha
  trl_sft = -torch.tensor(np.asarray(logp[0]))[torch.tensor(chosen)].mean().item()
  assert float(sums["weight"]) == 2 and chosen.sum() == 8
  np.testing.assert_allclose(float(with_rpo - plain) / 2, 0.5 * trl_sft, rtol=1e-5)

  cfg.train.dpo.update(rpo_alpha=0.0, loss_type="ipo", beta=0.1)
  loss, ipo = dpo(params, batch, model=model, config=cfg)
  side = lambda p, c: (batch["pair_ids"][0] == p) & (batch["chosen"][0] == c) & (  # noqa: E731
      batch["loss_mask"][0] > 0)
  seq = {(p, c): float(jnp.sum(jnp.where(side(p, c), logp[0], 0.0))) for p in (1, 2)
         for c in (0, 1)}
  n = {(p, c): float(jnp.sum(side(p, c))) for p in (1, 2) for c in (0, 1)}
  # TRL: rewards from summed log-ratios; the loss from per-token averages
  rewards_chosen = sum(0.1 * (seq[p, 1] - 0.9 * seq[p, 1]) for p in (1, 2))
  np.testing.assert_allclose(float(ipo["rewards/chosen"]), rewards_chosen, rtol=1e-5)
  np.testing.assert_allclose(float(ipo["logps/rejected"]), seq[1, 0] + seq[2, 0], rtol=1e-5)
  delta = [0.1 * seq[p, 1] / n[p, 1] - 0.1 * seq[p, 0] / n[p, 0] for p in (1, 2)]
  np.testing.assert_allclose(float(loss), sum((x - 1 / 0.2) ** 2 for x in delta), rtol=1e-5)


def test_live_reference_matches_the_precomputed_one(config, tmp_path):
  """train.dpo.reference="live" computes each batch's reference as it is used: for a LoRA
  run the base with the adapters left out (no second copy). The same losses as the
  precomputed pass, starting at the reference (loss log 2)."""
  _write_pairs(tmp_path / "pairs.jsonl", 60)
  config.train.update(objective="dpo", steps=2, eval_every=2, checkpoint_every=2, log_every=1,
                      eval_batches=1)
  config.data.update(source="jsonl", paths=str(tmp_path / "pairs.jsonl"), seq_len=64,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.model.lora.update(rank=2, targets="q,v")
  config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  devices = jax.devices()[:1]
  train(config, tmp_path / "pre", devices=devices)
  config.train.dpo.reference = "live"
  train(config, tmp_path / "live", devices=devices)
  assert not (tmp_path / "live" / "data" / "reference_logps.npz").exists()
  live, pre = losses(tmp_path / "live"), losses(tmp_path / "pre")
  np.testing.assert_allclose(list(live.values()), list(pre.values()), rtol=1e-5)
  assert live[1] == pytest.approx(np.log(2), abs=1e-5)
  assert live[2] != pytest.approx(np.log(2), abs=1e-4)  # the adapters moved
