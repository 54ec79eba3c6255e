"""ORPO and SimPO against TRL 1.16's own ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss
(called on the same inputs), per pair and on a packed batch of a real model, and a short
run of each through the objective seam."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data import preference
from llm.objectives.orpo import odds_ratio_terms, orpo_loss
from llm.objectives.simpo import simpo_loss, simpo_losses
from tests.helpers import losses, tiny_config

torch = pytest.importorskip("torch")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
CPU = SimpleNamespace(device="cpu")


def _trl_orpo(chosen, rejected, beta):
  """TRL's ORPOTrainer.odds_ratio_loss, unbound, on per-pair average log-probabilities."""
  self = SimpleNamespace(beta=beta, accelerator=CPU)
  return orpo_trainer.ORPOTrainer.odds_ratio_loss(self, torch.tensor(chosen),
                                                  torch.tensor(rejected))


def _trl_cpo(chosen, rejected, **settings):
  self = SimpleNamespace(accelerator=CPU, loss_type="simpo", **settings)
  return cpo_trainer.CPOTrainer.cpo_loss(self, torch.tensor(chosen), torch.tensor(rejected))


def test_per_pair_losses_are_trls():
  rng = np.random.default_rng(0)
  # per-token averages, from near 0 (log1mexp's other branch) to very unlikely
  chosen = -np.abs(rng.normal(0.0, 2.0, 64)).astype(np.float64) - 1e-3
  rejected = -np.abs(rng.normal(0.0, 2.0, 64)).astype(np.float64) - 1e-3
  losses_, _, _, mean_ratio, mean_log_odds = _trl_orpo(chosen, rejected, 0.25)
  ratio, log_odds = odds_ratio_terms(jnp.asarray(chosen), jnp.asarray(rejected))
  np.testing.assert_allclose(0.25 * np.asarray(ratio), losses_.numpy(), rtol=1e-6)
  np.testing.assert_allclose(float(jnp.mean(log_odds)), mean_log_odds.item(), rtol=1e-6)
  np.testing.assert_allclose(float(jnp.mean(ratio)), mean_ratio.item(), rtol=1e-6)
  for settings in ({"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.0, "alpha": 0.0},
                   {"beta": 0.1, "simpo_gamma": 1.2, "label_smoothing": 0.2, "alpha": 0.0},
                   {"beta": 1.0, "simpo_gamma": 0.3, "label_smoothing": 0.0, "alpha": 0.25}):
    trl_losses, trl_chosen, trl_rejected = _trl_cpo(chosen, rejected, **settings)
    ours = simpo_losses(jnp.asarray(chosen), jnp.asarray(rejected), beta=settings["beta"],
                        gamma=settings["simpo_gamma"],
                        label_smoothing=settings["label_smoothing"], alpha=settings["alpha"])
    for mine, theirs in zip(ours, (trl_losses, trl_chosen, trl_rejected)):
      np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), rtol=1e-5, atol=1e-7)


def _batch_and_logps():
  """A packed batch of 3 pairs (prompt tokens masked out), a tiny model, and its per-token
  target log-probabilities by the plain reference path."""
  from llm.model import init_params, make_model, unbox
  from llm.training.reference import reference_logps
  cfg = tiny_config()
  rng = np.random.default_rng(1)
  tokenized = []
  for n, k, m, j in ((6, 3, 5, 2), (9, 5, 8, 4), (7, 2, 7, 3)):
    tokenized.append((rng.integers(3, 500, n).astype(np.int32), np.r_[np.zeros(n - k, bool),
                                                                     np.ones(k, bool)],
                      rng.integers(3, 500, m).astype(np.int32), np.r_[np.zeros(m - j, bool),
                                                                     np.ones(j, bool)]))
  batch = {k: jnp.asarray(v) for k, v in preference.pack_pairs(tokenized, seq_len=24).items()}
  assert batch["inputs"].shape[0] == 2  # two pairs in row 0, one in row 1
  model = make_model(cfg.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  logp = np.asarray(reference_logps(params, batch, model=model, config=cfg), np.float64)
  return cfg, model, params, batch, logp


def _per_pair(batch, logp):
  """(chosen avg logps, rejected avg logps, chosen completion logps flat, chosen sequence
  logps flat), pairs in order."""
  b = {k: np.asarray(v) for k, v in batch.items()}
  avg = {0: [], 1: []}
  completion, sequence = [], []
  for r in range(b["inputs"].shape[0]):
    for p in range(1, b["pair_ids"][r].max() + 1):
      for side in (1, 0):
        seq = (b["pair_ids"][r] == p) & (b["chosen"][r] == side)
        comp = seq & (b["loss_mask"][r] > 0)
        avg[side].append(logp[r][comp].mean())
        if side:
          completion += list(logp[r][comp])
          sequence += list(logp[r][seq])
  return (np.asarray(avg[1]), np.asarray(avg[0]), np.asarray(completion),
          np.asarray(sequence))


def test_orpo_and_simpo_on_a_batch_equal_trls():
  """Our loss on packed rows (weight: pairs) equals TRL's: its loss function on per-pair
  average log-probabilities plus its NLL (nn.CrossEntropyLoss's mean) over the chosen
  rows' labels: the whole sequence for ORPO, the completion for CPO."""
  cfg, model, params, batch, logp = _batch_and_logps()
  chosen, rejected, completion, sequence = _per_pair(batch, logp)
  cfg.train.objective = "orpo"
  cfg.train.orpo.beta = 0.3
  total, sums = orpo_loss(params, batch, model=model, config=cfg)
  losses_, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = _trl_orpo(
      chosen, rejected, 0.3)
  nll = -sequence.mean()  # "orpo chosen nll loss is computed over the full prompt and response"
  weight = float(sums["weight"])
  assert weight == 3
  np.testing.assert_allclose(float(total) / weight, nll - losses_.mean().item(), rtol=1e-5)
  expected = {"nll_loss": nll, "log_odds_ratio": log_odds_ratio.item(),
              "log_odds_chosen": log_odds_chosen.item(),
              "rewards/chosen": chosen_rewards.mean().item(),
              "rewards/rejected": rejected_rewards.mean().item(),
              "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
              "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
              "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
  for name, value in expected.items():
    np.testing.assert_allclose(float(sums[name]) / weight, value, rtol=1e-5, atol=1e-7,
                               err_msg=name)

  cfg.train.objective = "simpo"
  cfg.train.simpo.update(beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0, label_smoothing=0.1)
  total, sums = simpo_loss(params, batch, model=model, config=cfg)
  trl_losses, trl_chosen, trl_rejected = _trl_cpo(chosen, rejected, beta=2.0, simpo_gamma=0.5,
                                                  label_smoothing=0.1, alpha=0.0)
  nll = -completion.mean()  # CPO's NLL: the chosen labels, prompt masked
  np.testing.assert_allclose(float(total) / 3, trl_losses.mean().item() + 1.0 * nll, rtol=1e-5)
  np.testing.assert_allclose(float(sums["nll_loss"]) / 3, nll, rtol=1e-5)
  np.testing.assert_allclose(float(sums["rewards/margins"]) / 3,
                             (trl_chosen - trl_rejected).mean().item(), rtol=1e-5)
  cfg.train.simpo.cpo_alpha = 0.0  # SimPO proper: TRL skips the NLL, and logs it as 0
  total, sums = simpo_loss(params, batch, model=model, config=cfg)
  np.testing.assert_allclose(float(total) / 3, trl_losses.mean().item(), rtol=1e-5)
  assert float(sums["nll_loss"]) == 0.0


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_a_short_run_learns_the_preference_and_llm_evaluate_reports_it(objective, config,
                                                                      tmp_path):
  rng = np.random.default_rng(0)
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for _ in range(200):
      word = "".join(rng.choice(list("abcdefgh"), 4))
      f.write(json.dumps({"prompt": f"Is {word} a word?", "chosen": "yes",
                          "rejected": "no"}) + "\n")
  config.train.update(objective=objective, steps=12, eval_every=12, checkpoint_every=12,
                      log_every=1, eval_batches=2)
  config.data.update(source="jsonl", paths=str(tmp_path / "pairs.jsonl"), seq_len=96,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=2)
  if objective == "simpo":
    config.train.simpo.beta = 2.0
  from llm import objectives
  from llm.inference import load
  from llm.train import train
  last = train(config, tmp_path / "run", devices=jax.devices()[:1])
  assert last["eval_rewards/accuracies"] >= 0.9
  assert losses(tmp_path / "run")[12] < losses(tmp_path / "run")[1]
  saved, params, tok = load(tmp_path / "run")
  held = objectives.heldout(saved, params, tok, tmp_path / "run", batch_size=4)
  assert held["weight"] == 20 and held["rewards/accuracies"] >= 0.9
