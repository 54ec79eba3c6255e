"""GRPO: advantages and losses against TRL's formulas (written in torch), prompt formats,
and a short run whose held-out reward rises and which resumes exactly mid-round."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data import prompts
from llm.train import train
from llm.training import rewards
from llm.objectives.grpo import grpo_aggregate, grpo_token_losses
from llm.objectives.grpo import OBJECTIVE as GRPO
from tests.helpers import losses

torch = pytest.importorskip("torch")


def _trl_nanstd(t, dim=None):
  """trl.trainer.utils.nanstd."""
  mean = torch.nanmean(t, dim=dim, keepdim=True)
  variance = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True)
  count = torch.sum(~torch.isnan(t), dim=dim, keepdim=True)
  correction = torch.where(count > 1, count / (count - 1), torch.full_like(mean, float("nan")))
  std = torch.sqrt(variance * correction)
  return std.squeeze() if dim is None else std.squeeze(dim)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_trls(scale):
  g = 4
  r = np.random.default_rng(0).normal(size=(24,))
  r[5] = np.nan  # an unscorable completion
  r[8:12] = 1.0  # a group whose rewards are all equal
  t = torch.tensor(r)
  # GRPOTrainer._generate_and_score_completions (sum_then_normalize)
  mean = torch.nanmean(t.view(-1, g), dim=1).repeat_interleave(g)
  std = (_trl_nanstd(t.view(-1, g), dim=1).repeat_interleave(g) if scale != "batch"
         else _trl_nanstd(t).expand_as(t))
  adv = t - mean
  if scale != "none":
    adv = adv / (std + 1e-4)
  adv = torch.nan_to_num(adv, nan=0.0)
  ours, ours_std, _ = rewards.group_advantages(r, g, scale)
  np.testing.assert_allclose(ours, adv.numpy(), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(ours_std, std.numpy(), rtol=1e-6)
  assert np.all(ours[8:12] == 0)
  per_function = np.stack([r, np.where(np.arange(24) % 3 == 0, np.nan, 2 * r)], axis=1)
  per_function[7] = np.nan
  weighted = rewards.weighted_rewards(per_function, np.array([1.0, 0.5]))
  expected = torch.tensor(per_function * [1.0, 0.5]).nansum(dim=1)
  expected[torch.isnan(torch.tensor(per_function)).all(dim=1)] = float("nan")
  np.testing.assert_allclose(weighted, expected.numpy(), equal_nan=True)


def _trl_loss(logp, old, ref, adv, mask, *, loss_type, level, bias_correction_kl, beta,
              eps_low, eps_high, max_len, is_ratio=None):
  """GRPOTrainer._compute_loss of TRL 1.16, its formulas on torch tensors (one process,
  no accumulation): (loss, per-token KL, low-clipped, high-clipped). `is_ratio`: its vLLM
  importance-sampling correction, applied to the policy loss before the KL is added."""
  log_ratio = logp - old
  if level == "sequence":
    log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
  coef_1 = torch.exp(log_ratio)
  kl = torch.exp(ref - logp) - (ref - logp) - 1
  if bias_correction_kl:
    kl = kl * coef_1
  coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
  per_token = -torch.min(coef_1 * adv, coef_2 * adv)
  if is_ratio is not None:
    per_token = per_token * is_ratio
  per_token = per_token + beta * kl
  if loss_type == "grpo":
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
  elif loss_type == "bnpo":
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
  elif loss_type == "dr_grpo":
    loss = (per_token * mask).sum() / (per_token.size(0) * max_len)
  else:  # dapo over one batch: normalised by its completion tokens
    loss = (per_token * mask).sum() / mask.sum()
  return loss, kl, (coef_1 < 1 - eps_low) & (adv < 0), (coef_1 > 1 + eps_high) & (adv > 0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_token_losses_aggregation_and_gradients_are_trls(loss_type, level):
  """Losses, KL, clip flags and gradients against TRL 1.16's formulas, token-level and
  sequence-level (GSPO) importance ratios, with and without use_bias_correction_kl (which
  changes the gradient even on-policy, where the ratio is 1)."""
  rng = np.random.default_rng(1)
  b, t, max_len = 6, 10, 12
  logp, old, ref = (rng.normal(-2, 0.4, (b, t)).astype(np.float32) for _ in range(3))
  adv = np.repeat(rng.normal(size=(b, 1)), t, 1).astype(np.float32)
  mask = (np.arange(t)[None] >= rng.integers(1, 5, (b, 1))).astype(np.float32)
  mask[:, -2:] *= rng.integers(0, 2, (b, 2))
  kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28)
  T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
  J = jnp.asarray

  def ours(lp, old_lp, bias):
    loss, kl, low, high = grpo_token_losses(
        lp, old_lp, J(ref), J(adv), beta=kw["beta"], epsilon_low=kw["eps_low"],
        epsilon_high=kw["eps_high"], mask=J(mask), level=level, bias_correction_kl=bias)
    total, weight = grpo_aggregate(jnp.broadcast_to(loss, mask.shape), J(mask), loss_type,
                                   max_len)
    return total / weight, (kl, low, high)

  for bias in (True, False):
    expected, kl, low, high = _trl_loss(T(logp), T(old), T(ref), T(adv), T(mask),
                                        loss_type=loss_type, level=level,
                                        bias_correction_kl=bias, max_len=max_len, **kw)
    loss, (ours_kl, ours_low, ours_high) = ours(J(logp), J(old), bias)
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_kl), kl.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours_low), low.numpy())
    np.testing.assert_array_equal(np.asarray(ours_high), high.numpy())
    # on-policy (num_iterations = 1): the old policy is the policy itself, detached
    lp = T(logp).requires_grad_()
    _trl_loss(lp, lp.detach(), T(ref), T(adv), T(mask), loss_type=loss_type, level=level,
              bias_correction_kl=bias, max_len=max_len, **kw)[0].backward()
    grad = jax.grad(lambda x: ours(x, jax.lax.stop_gradient(x), bias)[0])(J(logp))
    np.testing.assert_allclose(np.asarray(grad), lp.grad.numpy(), rtol=1e-4, atol=1e-7)


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
  """TRL 1.16's GRPOTrainer._generate_and_score_completions, its vLLM importance-sampling
  correction (the lines that compute vllm_importance_sampling_ratio), on torch tensors."""
  import math
  diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
  if mode in ("sequence_mask", "sequence_truncate"):
    diff = diff.sum(dim=-1, keepdim=True)
  ratio = torch.exp(diff)
  if mode in ("sequence_truncate", "token_truncate"):
    return torch.clamp(ratio, min=clip_min, max=clip_max)
  lo = clip_min if clip_min is not None else -math.inf
  hi = clip_max if clip_max is not None else math.inf
  return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
def test_sampler_correction_is_trls(mode):
  """The importance-sampling correction for a sampler that is not the trainer
  (train.grpo.importance_sampling_correction) and the loss it weighs, against TRL 1.16."""
  from llm.training.rollouts import importance_sampling_ratio
  rng = np.random.default_rng(3)
  b, t = 12, 10
  logp, old, ref = (rng.normal(-2, 0.4, (b, t)).astype(np.float32) for _ in range(3))
  sampling = old + rng.normal(0, 0.5 if "token" in mode else 0.3, (b, t)).astype(np.float32)
  adv = np.repeat(rng.normal(size=(b, 1)), t, 1).astype(np.float32)
  mask = (np.arange(t)[None] >= rng.integers(1, 5, (b, 1))).astype(np.float32)
  T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
  for clip_min, trl_min in ((0.0, None), (0.5, 0.5)):
    ours = importance_sampling_ratio(old, sampling, mask, mode, clip_min, 2.0)
    theirs = _trl_is_ratio(T(old), T(sampling), T(mask), mode, trl_min, 2.0).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert 0 < (ours == (0.0 if "mask" in mode else 2.0)).sum() < ours.size  # both bounds bite
  is_ratio = np.broadcast_to(ours, (b, t))
  loss, *_ = grpo_token_losses(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref),
                               jnp.asarray(adv), beta=0.04, epsilon_low=0.2, epsilon_high=0.2,
                               mask=jnp.asarray(mask), is_ratio=jnp.asarray(is_ratio))
  total, weight = grpo_aggregate(loss, jnp.asarray(mask), "dapo", t)
  expected = _trl_loss(T(logp), T(old), T(ref), T(adv), T(mask), loss_type="dapo",
                       level="token", bias_correction_kl=True, beta=0.04, eps_low=0.2,
                       eps_high=0.2, max_len=t, is_ratio=T(is_ratio))[0]
  np.testing.assert_allclose(float(total / weight), expected.item(), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_samples_rounds_with_the_trainers_params_and_log_probabilities(dtype):
  """The engine sampler (llm.training.samplers) reads the trainer's arrays in place (an
  unscanned model: nothing copied), shares each prompt's pages among its samples, gives
  the static decoder's greedy tokens, and reports per sampled token the log-probability
  the trainer computes for it (logits / temperature): within 1e-5 in fp32."""
  from llm.model import init_params, make_model, unbox
  from llm.training.reference import reference_logps
  from llm.training.samplers import DecoderSampler, EngineSampler
  from llm.inference.sampling import SamplingParams
  from tests.helpers import tiny_config
  cfg = tiny_config().model
  cfg.update(scan_layers=False, dtype=dtype)
  model = make_model(cfg)
  params = unbox(init_params(model, jax.random.key(0), 8))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, int(n)).tolist() for n in (20, 7, 33)]
  engine = EngineSampler(cfg, None, (), max_model_len=64, max_num_seqs=12)
  sampling = SamplingParams(temperature=0.7, top_k=0, top_p=1.0)
  stop = [engine.generate(params, prompts, 4, 12, sampling, seed=5).ids[0][4]]
  engine.stop = tuple(stop)  # the same draws end the first completion at its 5th token
  e = engine.engine
  before = dict(e.counters)
  out = engine.generate(params, prompts, 4, 12, sampling, seed=5)
  assert len(out.ids[0]) == 5 and out.ids[0][-1] == stop[0]  # kept, with its logp
  assert [len(x) for x in out.logps] == [len(x) for x in out.ids]
  assert e.runner.params is None  # not held between rounds
  # each prompt ran once: samples 2-4 forked from the first's last position and pages
  assert e.counters["forked_samples"] - before["forked_samples"] == 3 * 3
  assert e.counters["batched_tokens"] - before["batched_tokens"] == (
      sum(map(len, prompts)) + sum(len(c) - 1 for c in out.ids))
  again = engine.generate(params, prompts, 4, 12, sampling, seed=5)
  assert again.ids == out.ids  # a round sampled again is the same
  assert [np.asarray(a).tobytes() for a in again.logps] == [a.tobytes() for a in out.logps]
  # in place: the runner's leaves are the caller's arrays
  e.set_params(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(e.runner.params), jax.tree.leaves(params)))
  e.set_params(None)
  rows = [p + out.ids[i * 4 + j] for i, p in enumerate(prompts) for j in range(4)]
  width = max(map(len, rows))
  tokens = np.zeros((len(rows), width + 1), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
           "segment_ids": jnp.asarray((np.arange(width)[None] < np.asarray(
               [len(r) - 1 for r in rows])[:, None]).astype(np.int32)),
           "positions": jnp.broadcast_to(jnp.arange(width), (len(rows), width))}
  trainer = np.asarray(reference_logps(params, batch, model=model, temperature=0.7))
  diffs = []
  for i, r in enumerate(rows):
    p = len(prompts[i // 4])
    diffs.append(np.abs(trainer[i, p - 1:len(r) - 1] - out.logps[i]))
  diff = np.concatenate(diffs)
  print(dtype, "max |sampler - trainer| logp", diff.max(), "mean", diff.mean())
  assert diff.max() < (1e-5 if dtype == "float32" else 0.1)
  greedy = SamplingParams(temperature=0.0)
  if dtype == "float32":
    decoded = DecoderSampler(cfg, None, stop, 64, 3).generate(params, prompts, 1, 12, greedy, 0)
    assert engine.generate(params, prompts, 1, 12, greedy, 0).ids == decoded.ids


def test_scoring_uses_the_sampling_temperature():
  """With train.grpo.temperature = 0.7 the policy's log-probabilities are those of
  logits / 0.7, as TRL scores them (the reference's and sampling policy's too)."""
  from llm.model import forward, init_params, make_model, unbox
  from llm.training.reference import reference_logps
  from tests.helpers import tiny_config
  cfg = tiny_config()
  model = make_model(cfg.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((2, 8), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(8), (2, 8))}
  logits = forward(model, params, batch)[0].astype(jnp.float32)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), batch["targets"][..., None],
                                 -1)[..., 0]
  got = reference_logps(params, batch, model=model, temperature=0.7)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_prompt_formats():
  p = prompts.to_prompt({"prompt": "2+2?", "answer": "4", "level": 1})
  assert p.messages == [{"role": "user", "content": "2+2?"}]
  assert p.columns == {"answer": "4", "level": 1}
  p = prompts.to_prompt({"messages": [{"role": "user", "content": "Reverse: ab"},
                                      {"role": "assistant", "content": "ba"}]})
  assert p.messages == [{"role": "user", "content": "Reverse: ab"}] and p.columns == {
      "answer": "ba"}
  with pytest.raises(ValueError, match="must end with a user"):
    prompts.to_prompt({"prompt": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]})
  assert rewards.exact_match([" ba ", "ab"], answer=["ba", "ba"]) == [1.0, 0.0]
  assert rewards.one_line(["a b", "a\nb", " "]) == [1.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="'answer' field"):
    rewards.similarity(["x"])


def _letter_e(completions, **_):
  """A reward a tiny random model can learn in a few steps: the share of 'e's."""
  return [c.count("e") / max(len(c), 1) for c in completions]


def test_grpo_raises_held_out_reward_and_resumes_exactly_mid_round(config, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "letter_e", _letter_e)
  words = np.random.default_rng(0).choice(list("abcdfgh"), (200, 4))
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": f"Say {''.join(w)}", "answer": "".join(w)}) + "\n")
  config.train.update(objective="grpo", steps=8, batch_size=16, checkpoint_every=3,
                      eval_every=8, log_every=1)
  config.train.grpo.update(num_generations=4, max_new_tokens=8, rewards="letter_e,exact_match",
                           reward_weights="1,0.5", beta=0.04, num_iterations=2, eval_prompts=8)
  config.data.update(source="jsonl", paths=str(tmp_path / "prompts.jsonl"), seq_len=32,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  config.mesh.data = 2
  devices = jax.devices()[:2]
  train(config, tmp_path / "straight", devices=devices)
  records = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
  evals = [r for r in records if "eval_reward" in r]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 8
  print("held-out reward", evals[0]["eval_reward"], "->", evals[-1]["eval_reward"])
  assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.1
  last = records[-1]
  for name in ("reward", "reward_std", "kl", "clip_ratio/region_mean", "completions/mean_length",
               "completions/clipped_ratio", "rewards/letter_e/mean", "rewards/exact_match/mean",
               "frac_reward_zero_std"):
    assert name in last, name
  assert last["kl"] > 0
  # the engine (the default sampler) and the trainer agree on the sampled tokens' logps
  parity = [r["sampling/sampling_logp_difference/max"] for r in records
            if "sampling/sampling_logp_difference/max" in r]
  assert parity and max(parity) < 1e-5, parity
  config.train.steps = 3  # a checkpoint in the middle of round 1 (steps 2 and 3)
  train(config, tmp_path / "resumed", devices=devices)
  assert (tmp_path / "resumed" / "rollouts" / "3.npz").is_file()
  config.train.steps = 8
  train(config, tmp_path / "resumed", devices=devices)
  assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_grpo_config_errors(config):
  from llm import config as config_lib
  config.train.update(objective="grpo", batch_size=8)
  config.train.grpo.max_new_tokens = 8
  config.data.paths = "x.jsonl"
  config.train.grpo.update(num_generations=3)
  with pytest.raises(ValueError, match="multiple of train.grpo.num_generations=3"):
    config_lib.validate(config)
  config.train.grpo.update(num_generations=4, rewards="exact,one_line")
  with pytest.raises(ValueError, match="allowed reward functions are"):
    config_lib.validate(config)
  config.train.grpo.update(rewards="", reward_model="")
  with pytest.raises(ValueError, match="needs a reward"):
    config_lib.validate(config)
  config.train.grpo.update(rewards="exact_match", reward_weights="1,2")
  with pytest.raises(ValueError, match="2 weight"):
    config_lib.validate(config)
  config.train.grpo.update(reward_weights="", max_new_tokens=config.data.seq_len)
  with pytest.raises(ValueError, match="train.grpo.max_new_tokens"):
    config_lib.validate(config)
  config.train.grpo.update(max_new_tokens=8, old_logps="sampler")
  config.train.sampler = "decoder"
  with pytest.raises(ValueError, match="old_logps='sampler' needs the sampler's log-prob.*"
                                       "train.sampler='decoder'"):
    config_lib.validate(config)
  config.train.sampler = "engine"
  config.train.grpo.importance_sampling_correction = "token_truncate"
  with pytest.raises(ValueError, match="computes none of the trainer's"):
    config_lib.validate(config)
  config.train.grpo.update(old_logps="trainer", importance_sampling_clip_min=3.0)
  with pytest.raises(ValueError, match="importance_sampling_clip_min=3.0 must be in"):
    config_lib.validate(config)
  config.train.grpo.update(importance_sampling_clip_min=0.0, importance_sampling_correction="x")
  with pytest.raises(ValueError, match="importance_sampling_correction"):
    config_lib.validate(config)


def test_rewards_need_every_answer_and_damaged_rollouts_are_named(config, tmp_path):
  from llm.training.rollouts import rollouts_problem
  assert rewards.exact_match(["4", "5"], answer=["4", "4"]) == [1.0, 0.0]
  with pytest.raises(ValueError, match=r"'answer' field, which completion\(s\) \[1\] lack"):
    rewards.exact_match(["None", "None"], answer=["x", None])  # not scored against "None"
  config.train.update(objective="grpo")
  config.train.grpo.update(num_iterations=2)
  assert rollouts_problem(tmp_path, config, 4, GRPO.batch_fields()) is None  # a round boundary needs none
  assert "rollouts" in rollouts_problem(tmp_path, config, 3, GRPO.batch_fields()) and "missing" in \
      rollouts_problem(tmp_path, config, 3, GRPO.batch_fields())
  (tmp_path / "rollouts").mkdir()
  path = tmp_path / "rollouts" / "3.npz"
  fields = {k: np.zeros((4, 8), np.float32) for k in GRPO.batch_fields()}
  np.savez(path, round=1, **fields)
  assert rollouts_problem(tmp_path, config, 3, GRPO.batch_fields()) is None
  data = bytearray(path.read_bytes())
  data[200:260] = bytes(b ^ 0xFF for b in data[200:260])
  path.write_bytes(bytes(data))
  assert "3.npz are damaged" in rollouts_problem(tmp_path, config, 3, GRPO.batch_fields())
  path.write_bytes(bytes(data[:len(data) // 2]))  # truncated (e.g. a full disk)
  assert "3.npz are damaged (BadZipFile" in rollouts_problem(tmp_path, config, 3, GRPO.batch_fields())


def test_prompts_without_answers_are_refused_before_training(config, tmp_path):
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"prompt": f"Say {i}", **({"answer": str(i)} if i != 7 else {})}) + "\n")
  config.train.update(objective="grpo", steps=2, batch_size=8)
  config.train.grpo.update(num_generations=4, max_new_tokens=8, rewards="exact_match", beta=0.0)
  config.data.update(source="jsonl", paths=str(tmp_path / "prompts.jsonl"), seq_len=32)
  config.data.chat.template = "mistral"
  with pytest.raises(ValueError, match=r"prompts.jsonl:8: the prompt has no 'answer', which the "
                                       r"reward 'exact_match' .* \(1 prompt\(s\) lack it\)"):
    train(config, tmp_path / "w", devices=jax.devices()[:1])
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_lora_grpo_keeps_no_reference_copy_its_base_is_the_reference(config, tmp_path):
  """With LoRA the reference policy is the base with the adapters left out: at step 1
  (adapters at zero) the policy is the reference, so the KL is 0; after an update not."""
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for i in range(20):
      f.write(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n")
  config.model.lora.update(rank=2, targets="q,v")
  config.train.update(objective="grpo", steps=2, batch_size=8, checkpoint_every=2,
                      eval_every=2, log_every=1)
  config.train.grpo.update(num_generations=4, max_new_tokens=6, rewards="similarity",
                           beta=0.1, eval_prompts=2)
  config.data.update(source="jsonl", paths=str(tmp_path / "prompts.jsonl"), seq_len=32,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  train(config, tmp_path / "run", devices=jax.devices()[:1])
  records = {r["step"]: r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
             if "kl" in r}
  assert records[1]["kl"] == pytest.approx(0.0, abs=1e-6)
  assert records[2]["kl"] > 1e-6


@pytest.mark.parametrize("old_logps,correction", [("sampler", "none"),
                                                  ("trainer", "sequence_truncate")])
def test_old_logps_from_the_sampler_skip_the_trainers_pass(config, tmp_path, monkeypatch,
                                                           old_logps, correction):
  """train.grpo.old_logps="sampler": the engine's log-probabilities are the importance
  ratio's denominator and the trainer makes no pass over the round (nor logs parity); with
  the trainer's and a correction, the ratios are logged (1 here: the two agree)."""
  from llm.training import reference
  calls = []
  init = reference.LiveReference.__init__

  def counting(self, *a, **k):
    init(self, *a, **k)
    fn = self.policy_logps
    self.policy_logps = lambda *x: (calls.append(1), fn(*x))[1]
  monkeypatch.setattr(reference.LiveReference, "__init__", counting)
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for i in range(20):
      f.write(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n")
  config.train.update(objective="grpo", steps=2, batch_size=8, checkpoint_every=2,
                      eval_every=2, log_every=1)
  config.train.grpo.update(num_generations=4, max_new_tokens=6, rewards="similarity",
                           beta=0.0, num_iterations=2, eval_prompts=2, old_logps=old_logps,
                           importance_sampling_correction=correction)
  config.data.update(source="jsonl", paths=str(tmp_path / "prompts.jsonl"), seq_len=32,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  train(config, tmp_path / "run", devices=jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  first = next(r for r in records if r.get("step") == 1 and "loss" in r)
  assert len(calls) == (old_logps == "trainer")  # one round, one pass (or none)
  assert ("sampling/sampling_logp_difference/max" in first) == (old_logps == "trainer")
  if correction != "none":
    for name in ("min", "mean", "max"):
      assert first[f"sampling/importance_sampling_ratio/{name}"] == pytest.approx(1.0, abs=1e-4)
  assert first["clip_ratio/region_mean"] == 0.0  # the first step: old = the policy
