"""The train step against references: NumPy cross-entropy, one big batch, one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data import pipeline
from llm.model import make_model
from llm.parallel.mesh import make_mesh
from llm.train import train
from llm.objectives.pretrain import next_token
from llm.training.optim import make_optimizer, schedule
from llm.training.state import init_state, state_shardings
from llm.objectives import loss_fn
from llm.training.step import train_step
from tests.helpers import losses


def _setup(config, tmp_path, batch_size=8):
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  model = make_model(config.model)
  tx = make_optimizer(config.optim, config.train.steps)
  _, shardings = state_shardings(model, tx, config.data.seq_len, mesh)
  state = init_state(model, tx, config.data.seq_len, config.seed, shardings)
  rows = pipeline.DOCUMENTS.prepare(config, tmp_path).train
  batch = {k: jnp.asarray(v) for k, v in next(pipeline.train_iterator(rows, batch_size, 0)).items()}
  return model, tx, state, batch


def _step(config, model, tx, grad_accum=1):
  return jax.jit(functools.partial(train_step, objective=loss_fn(config, model), tx=tx,
                                   lr_schedule=schedule(config.optim, config.train.steps),
                                   grad_accum=grad_accum))


def test_loss_is_masked_mean_cross_entropy(config, tmp_path):
  model, _, state, batch = _setup(config, tmp_path)
  config.train.z_loss = 1e-4
  total, sums = next_token(state.params, batch, model=model, config=config)
  nll, z, tokens = sums["loss"], sums["z_loss"], sums["weight"]
  logits = np.asarray(model.apply({"params": state.params}, batch["inputs"], batch["segment_ids"],
                                  batch["positions"]), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"])
  assert mask.sum() < mask.size  # the batch crosses document boundaries
  np.testing.assert_allclose(float(nll), ((logz - picked) * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(z), (logz ** 2 * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(nll) + 1e-4 * float(z), rtol=1e-6)
  assert float(tokens) == mask.sum()


def test_gradient_accumulation_matches_one_big_batch(config, tmp_path):
  model, tx, state, batch = _setup(config, tmp_path)
  one, m1 = _step(config, model, tx, 1)(state, batch)
  four, m4 = _step(config, model, tx, 4)(state, batch)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), four.params, one.params)


def test_non_finite_update_is_skipped_and_counted(config, tmp_path):
  model, tx, state, batch = _setup(config, tmp_path)
  bad = state.replace(params={**state.params, "final_norm": {"scale": state.params["final_norm"]["scale"].at[0].set(jnp.nan)}})
  new, metrics = _step(config, model, tx)(bad, batch)
  assert int(new.skipped) == 1 and int(metrics["skipped_steps"]) == 1 and int(new.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, bad.params)
  good, metrics = _step(config, model, tx)(state, batch)
  assert int(good.skipped) == 0 and np.isfinite(metrics["loss"])


def test_weight_decay_spares_norm_scales(config, tmp_path):
  config.optim.update(lr=1e-2, weight_decay=0.5, clip_norm=0.0, warmup_steps=0)
  model, tx, state, _ = _setup(config, tmp_path)
  zero = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = tx.update(zero, tx.init(state.params), state.params)
  assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(updates["layers"]["mlp"]["up"]["kernel"]).max()) > 0.0


def test_schedules_follow_their_formulas(config):
  o, steps = config.optim, 100
  o.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
  o.schedule = "cosine"
  f = schedule(o, steps)
  assert float(f(5)) == pytest.approx(0.5)
  assert float(f(10)) == pytest.approx(1.0)
  assert float(f(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
  assert float(f(100)) == pytest.approx(0.1)
  o.schedule = "wsd"
  f = schedule(o, steps)
  assert float(f(50)) == pytest.approx(1.0) and float(f(100)) == pytest.approx(0.1)
  assert float(f(91)) == pytest.approx(1.0 - 0.9 * (91 - 82) / 18)
  o.schedule = "constant"
  assert float(schedule(o, steps)(99)) == pytest.approx(1.0)


def test_sharded_training_matches_one_device(config, tmp_path):
  """data=2, fsdp=2, tensor=2 on 8 devices gives the losses of a 1-device run."""
  config.train.update(steps=6, grad_accum=2)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  train(config, tmp_path / "eight")
  one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
  assert sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=2e-5)
  assert one[6] < one[1]


def test_batch_and_mesh_errors(config, tmp_path):
  config.mesh.update(data=3)
  with pytest.raises(ValueError, match="mesh .* has 3 devices but 8 are available"):
    train(config, tmp_path)
  config.mesh.update(data=8)
  config.train.batch_size = 12
  with pytest.raises(ValueError, match="train.batch_size=12 must be divisible by the "
                                       r"data-parallel size \(mesh data x fsdp = 8\)"):
    train(config, tmp_path)
