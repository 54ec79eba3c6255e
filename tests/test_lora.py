"""LoRA: zero-initialised B gives the base model at step 0; only adapters train (the base
stays bit-identical and has no optimizer state); merged equals unmerged; a LoRA run
from a pretrained workdir loads merged for inference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm.model import forward, init_params, lora, make_model, unbox
from llm.training.optim import make_optimizer, schedule
from llm.training.state import TrainState
from llm.training.step import make_objective, train_step
from llm.train import train
from llm.workdir import load_params
from tests.helpers import losses, tiny_config


def _batch(cfg, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (2, 9), 0, cfg.model.vocab_size)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": jnp.ones((2, 8), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
          "loss_mask": jnp.ones((2, 8), jnp.float32)}


def _models(targets="q,k,v,o,gate,up,down"):
  base_cfg = tiny_config()
  lora_cfg = tiny_config()
  lora_cfg.model.lora.update(rank=4, alpha=8.0, targets=targets)
  config_lib.validate(lora_cfg)
  base_params = unbox(init_params(make_model(base_cfg.model), jax.random.key(0), 8))
  adapted = unbox(init_params(make_model(lora_cfg.model), jax.random.key(5), 8))
  _, adapters = lora.split(adapted)
  return base_cfg, lora_cfg, base_params, lora.join(base_params, adapters)


def _logits(model_cfg, params, batch):
  return jax.jit(functools.partial(forward, make_model(model_cfg)))(params, batch)[0]


def test_step0_equals_base_and_merged_equals_unmerged():
  base_cfg, lora_cfg, base_params, params = _models()
  batch = _batch(base_cfg)
  base_logits = _logits(base_cfg.model, base_params, batch)
  lora_logits = _logits(lora_cfg.model, params, batch)
  np.testing.assert_array_equal(lora_logits, base_logits)  # B = 0
  # non-zero B: the adapted model equals the base model with the adapters folded in
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 if path[-1].key == "lora_b" else x, params)
  adapted = _logits(lora_cfg.model, params, batch)
  merged, merged_cfg = lora.merge(params, lora_cfg.model)
  assert merged_cfg.lora.rank == 0 and not lora.split(merged)[1]
  folded = _logits(merged_cfg, merged, batch)
  assert np.max(np.abs(adapted - base_logits)) > 1e-2
  np.testing.assert_allclose(folded, adapted, atol=2e-5)


def test_only_adapters_train_and_hold_optimizer_state():
  _, cfg, _, params = _models("q,v,down")
  tx = make_optimizer(cfg.optim, 10, cfg.model)
  opt_state = tx.init(params)
  n_moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  adapter_size = sum(x.size for x in jax.tree.leaves(lora.split(params)[1]))
  assert n_moments == 2 * adapter_size  # Adam's m and v for the adapters, nothing for the base
  state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state,
                     skipped=jnp.int32(0))
  objective = make_objective(cfg, make_model(cfg.model))
  grads = jax.jit(jax.grad(lambda p: objective(p, _batch(cfg))[0]))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if lora.is_adapter(path) and path[-1].key == "lora_a":
      assert not np.any(g)  # B = 0: no signal reaches A at step 0
    elif not lora.is_adapter(path):
      assert not np.any(g), jax.tree_util.keystr(path)
  assert any(np.any(g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
             if lora.is_adapter(path))
  step = jax.jit(functools.partial(train_step, objective=objective, tx=tx,
                                   lr_schedule=schedule(cfg.optim, 10), grad_accum=1))
  for _ in range(2):
    state, _ = step(state, _batch(cfg))
  before_base, before_adapters = lora.split(params)
  after_base, after_adapters = lora.split(state.params)
  jax.tree.map(np.testing.assert_array_equal, after_base, before_base)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), after_adapters, before_adapters)
  assert all(jax.tree.leaves(changed))


def test_bad_targets_are_named():
  cfg = tiny_config()
  cfg.model.lora.update(rank=4, targets="q,embed")
  with pytest.raises(ValueError, match=r"model.lora.targets='q,embed': allowed targets are"):
    config_lib.validate(cfg)


def test_lora_run_from_a_pretrained_workdir_loads_merged(config, tmp_path):
  config.train.update(steps=2, checkpoint_every=2, eval_every=2)
  train(config, tmp_path / "base", devices=jax.devices()[:1])
  _, base = load_params(tmp_path / "base")
  config.model.lora.update(rank=2, targets="q,v")
  config.train.update(init_params=str(tmp_path / "base"), steps=4, checkpoint_every=4)
  config.optim.update(lr=1e-2, warmup_steps=0)
  train(config, tmp_path / "lora", devices=jax.devices()[:1])
  assert sorted(losses(tmp_path / "lora")) == [1, 2, 3, 4]
  loaded_cfg, merged = load_params(tmp_path / "lora")
  assert loaded_cfg.model.lora.rank == 0
  # untargeted weights are the pretrained ones; targeted kernels moved by the adapters
  np.testing.assert_array_equal(merged["layers"]["mlp"]["up"]["kernel"],
                                base["layers"]["mlp"]["up"]["kernel"])
  assert np.any(merged["layers"]["attn"]["q"]["kernel"] != base["layers"]["attn"]["q"]["kernel"])
