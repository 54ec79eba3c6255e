"""Reward models: the Bradley-Terry loss against TRL's formula, the score read at each
sequence's last token (packed rows against one sequence at a time), and a short run whose
held-out pairwise accuracy rises, scored again by RewardScorer and used as a GRPO reward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data import preference
from llm.eval.scorer import RewardScorer
from llm.model import init_params, make_model, unbox
from llm.train import train
from llm.objectives.reward import bradley_terry_losses, reward_loss as reward
from tests.helpers import tiny_config

torch = pytest.importorskip("torch")


def test_bradley_terry_loss_is_trls():
  rng = np.random.default_rng(0)
  chosen, rejected = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
  c, r = torch.tensor(chosen), torch.tensor(rejected)
  # RewardTrainer.compute_loss, with center_rewards_coefficient
  expected = (-torch.nn.functional.logsigmoid(c - r).mean()
              + 0.01 * torch.mean((c + r) ** 2)).item()
  ours = float(jnp.mean(bradley_terry_losses(chosen, rejected, 0.01)))
  np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_rewards_are_the_scores_at_each_sequences_last_token():
  cfg = tiny_config()
  cfg.model.head = "score"
  cfg.train.objective = "reward"
  rng = np.random.default_rng(0)
  mask = lambda n, k: np.r_[np.zeros(n - k, bool), np.ones(k, bool)]  # noqa: E731
  seqs = [(rng.integers(3, 500, n).astype(np.int32), mask(n, 2),
           rng.integers(3, 500, m).astype(np.int32), mask(m, 3)) for n, m in ((6, 5), (7, 8),
                                                                              (4, 9))]
  margins = [0.5, 0.0, 2.0]  # TRL's optional per-pair margin
  scored = [tuple(preference._scored_at_last(*s)) + (m,) for s, m in zip(seqs, margins)]
  batch = {k: jnp.asarray(v) for k, v in preference.pack_pairs(scored, seq_len=32).items()}
  model = make_model(cfg.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  total, sums = reward(params, batch, model=model, config=cfg)
  scores = jax.jit(lambda t: model.apply({"params": params}, t))
  # one sequence alone, right-padded (causal: the pads do not reach its last token)
  alone = lambda ids: float(scores(jnp.zeros((1, 16), jnp.int32).at[0, :len(ids)].set(ids))[  # noqa
      0, len(ids) - 1])
  chosen = np.array([alone(c) for c, _, _, _ in seqs])
  rejected = np.array([alone(r) for _, _, r, _ in seqs])
  assert float(sums["weight"]) == 3
  np.testing.assert_allclose(float(sums["margin"]), (chosen - rejected).sum(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(float(total), float(jnp.sum(bradley_terry_losses(
      chosen, rejected, margin=np.array(margins)))), rtol=1e-5)
  expected = -torch.nn.functional.logsigmoid(torch.tensor(chosen - rejected - margins)).sum()
  np.testing.assert_allclose(float(total), expected.item(), rtol=1e-5)
  assert float(sums["accuracy"]) == np.sum(chosen > rejected)
  both = np.concatenate([chosen, rejected])  # (as sums: times the weight, 3 pairs)
  np.testing.assert_allclose(float(sums["min_reward"]) / 3, both.min(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(sums["max_reward"]) / 3, both.max(), rtol=1e-4, atol=1e-6)


def test_reward_model_learns_held_out_preferences_and_rewards_grpo(config, tmp_path):
  rng = np.random.default_rng(0)
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for _ in range(300):
      word = "".join(rng.choice(list("abcdefgh"), 4))
      f.write(json.dumps({"prompt": f"Is {word} a word?", "chosen": "yes",
                          "rejected": "no", "margin": 0.5}) + "\n")
  with pytest.raises(ValueError, match="'margin' must be a finite number"):
    preference._margin({"margin": "big"}, "x.jsonl:1")
  config.model.head = "score"
  config.train.update(objective="reward", steps=16, eval_every=16, checkpoint_every=16,
                      eval_batches=4)
  config.data.update(source="jsonl", paths=str(tmp_path / "pairs.jsonl"), seq_len=64,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=2)
  last = train(config, tmp_path / "rm", devices=jax.devices()[:1])
  assert last["eval_accuracy"] >= 0.9 and last["eval_loss"] < np.log(2)
  scorer = RewardScorer(tmp_path / "rm")
  prompt = [{"role": "user", "content": "Is abcd a word?"}]
  yes, no = scorer.score([prompt + [{"role": "assistant", "content": a}] for a in ("yes", "no")])
  assert yes > no
  # llm.evaluate of a reward workdir: its metrics over every validation pair, equal to what
  # the scorer finds for those pairs' whole conversations
  from llm import objectives
  from llm.data.packing import split
  from llm.inference import load
  saved, params, tok = load(tmp_path / "rm")
  held = objectives.heldout(saved, params, tok, tmp_path / "rm", batch_size=4)
  pairs = preference.pairs(saved.data)
  pairs = pairs[split(len(pairs), saved.data):]
  chosen, rejected = (np.asarray(scorer.score([p[side] for p in pairs])) for side in (0, 1))
  assert held["weight"] == len(pairs) == 30
  assert held["accuracy"] == pytest.approx(np.mean(chosen > rejected))
  np.testing.assert_allclose(held["margin"], np.mean(chosen - rejected), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(held["mean_reward"], np.mean((chosen + rejected) / 2), rtol=1e-4,
                             atol=1e-5)
  # the reward model as a GRPO reward (its score is logged as rewards/reward_model/mean)
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for _ in range(40):
      f.write(json.dumps({"prompt": "Is abcd a word?"}) + "\n")
  grpo = tiny_config()
  grpo.data.update(source="jsonl", paths=str(tmp_path / "prompts.jsonl"), seq_len=32,
                   tokenizer_path=config.data.tokenizer_path)
  grpo.data.chat.template = "mistral"
  grpo.train.update(objective="grpo", steps=1, batch_size=8, eval_every=1, checkpoint_every=1)
  grpo.optim.warmup_steps = 0
  grpo.train.grpo.update(num_generations=4, max_new_tokens=4, rewards="",
                         reward_model=str(tmp_path / "rm"), eval_prompts=4)
  out = train(grpo, tmp_path / "grpo", devices=jax.devices()[:1])
  assert np.isfinite(out["rewards/reward_model/mean"]) and np.isfinite(out["eval_reward"])
  with pytest.raises(ValueError, match="not a reward model"):
    RewardScorer(tmp_path / "grpo")


def test_reward_model_takes_its_backbone_from_a_params_only_language_model(tmp_path):
  from jax.sharding import NamedSharding, PartitionSpec as P

  from llm.params import abstract_params
  from llm.workdir import restore_params, save_params
  lm_cfg = tiny_config().model
  lm_cfg.tie_embeddings = False  # the LM has an unembedding the reward model lacks
  lm = unbox(init_params(make_model(lm_cfg), jax.random.key(0), 8))
  save_params(tmp_path / "lm", lm)
  rm_cfg = tiny_config().model
  rm_cfg.update(tie_embeddings=False, head="score")
  replicated = NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("all",)), P())
  target = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=replicated), v)
            for k, v in unbox(abstract_params(rm_cfg)).items() if k != "score"}
  assert "unembed" not in target
  restored = restore_params(tmp_path / "lm", target, partial=True)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({k: lm[k] for k in target})):
    np.testing.assert_array_equal(a, b)
