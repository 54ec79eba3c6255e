"""LoRA: zero-initialised B gives the base model at step 0; only adapters train (the base
stays bit-identical and has no optimizer state); merged equals unmerged; a LoRA run
from a pretrained workdir loads merged for inference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from llm import config as config_lib
from llm.model import forward, init_params, lora, make_model, quant, unbox
from llm.training.optim import make_optimizer, schedule
from llm.parallel.mesh import make_mesh
from llm.training.state import TrainState, state_shardings
from llm.objectives import loss_fn
from llm.training.step import train_step
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
  tx = make_optimizer(cfg.optim, 10)
  abstract, _ = state_shardings(make_model(cfg.model), tx, 8,
                                make_mesh(cfg.mesh, jax.devices()[:1]))
  n_moments = sum(x.size for x in jax.tree.leaves(abstract.opt_state) if x.ndim > 0)
  adapter_size = sum(x.size for x in jax.tree.leaves(lora.split(params)[1]))
  assert n_moments == 2 * adapter_size  # Adam's m and v for the adapters, nothing for the base
  opt_state = tx.init(lora.trainable(params, cfg.model))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state,
                     skipped=jnp.int32(0))
  objective = loss_fn(cfg, make_model(cfg.model))
  step = jax.jit(functools.partial(train_step, objective=objective, tx=tx,
                                   lr_schedule=schedule(cfg.optim, 10), grad_accum=1,
                                   frozen_base=True))
  # the step's gradient is the adapters' own: its norm equals that of jax.grad w.r.t. them
  base, adapters = lora.split(params)
  adapter_grads = jax.grad(lambda a: objective(lora.join(base, a), _batch(cfg))[0])(adapters)
  _, metrics = step(state, _batch(cfg))
  weight = float(jnp.sum(_batch(cfg)["loss_mask"]))
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(adapter_grads) / weight,
                             rtol=1e-5)
  for _ in range(2):
    state, _ = step(state, _batch(cfg))
  # LoRA dropout: masks from (seed, step); none without a key (evaluation, generation)
  cfg.model.lora.dropout = 0.5
  dropped = functools.partial(train_step, objective=loss_fn(cfg, make_model(cfg.model)),
                              tx=tx, lr_schedule=schedule(cfg.optim, 10), grad_accum=1,
                              frozen_base=True)
  losses_by_seed = [float(jax.jit(functools.partial(dropped, dropout_seed=seed))(
      state, _batch(cfg))[1]["loss"]) for seed in (0, 0, 1)]
  assert losses_by_seed[0] == losses_by_seed[1] != losses_by_seed[2]
  no_key, _ = forward(make_model(cfg.model), state.params, _batch(cfg))
  np.testing.assert_allclose(no_key, _logits(_float_cfg_lora(cfg, 0.0), state.params,
                                             _batch(cfg)), atol=1e-5)
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
  cfg.model.update(mlp="moe")
  cfg.model.lora.targets = "q,up"
  with pytest.raises(ValueError, match="LoRA does not adapt MoE experts"):
    config_lib.validate(cfg)
  cfg = tiny_config()
  cfg.model.lora.base_quant = "nf4"
  with pytest.raises(ValueError, match="quantizes the frozen base of a LoRA run"):
    config_lib.validate(cfg)


def test_lora_run_from_a_pretrained_workdir_loads_merged(config, tmp_path):
  config.train.update(steps=2, checkpoint_every=2, eval_every=2)
  train(config, tmp_path / "base", devices=jax.devices()[:1])
  _, base = load_params(tmp_path / "base")
  config.model.lora.update(rank=2, targets="q,v", dropout=0.1)  # masks keyed on the step
  config.train.update(init_params=str(tmp_path / "base"), steps=4, checkpoint_every=4)
  config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")  # same lr however long
  train(config, tmp_path / "straight", devices=jax.devices()[:1])
  config.train.steps = 2
  train(config, tmp_path / "lora", devices=jax.devices()[:1])
  config.train.steps = 4
  train(config, tmp_path / "lora", devices=jax.devices()[:1])  # resumes: adapters + base
  assert losses(tmp_path / "lora") == losses(tmp_path / "straight")
  assert sorted(losses(tmp_path / "lora")) == [1, 2, 3, 4]
  with ocp.PyTreeCheckpointer() as ckptr:  # the checkpoint holds the adapters only
    saved = ckptr.metadata(tmp_path / "lora" / "checkpoints" / "4" / "state").item_metadata
  saved_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(saved["params"])[0]]
  assert saved_paths and all("lora_" in p for p in saved_paths)
  loaded_cfg, merged = load_params(tmp_path / "lora")
  assert loaded_cfg.model.lora.rank == 0
  # untargeted weights are the pretrained ones; targeted kernels moved by the adapters
  np.testing.assert_array_equal(merged["layers"]["mlp"]["up"]["kernel"],
                                base["layers"]["mlp"]["up"]["kernel"])
  assert np.any(merged["layers"]["attn"]["q"]["kernel"] != base["layers"]["attn"]["q"]["kernel"])
  # QLoRA: the same run with the base stored as NF4
  config.model.lora.base_quant = "nf4"
  config.train.update(steps=2, checkpoint_every=2)
  train(config, tmp_path / "qlora", devices=jax.devices()[:1])
  assert sorted(losses(tmp_path / "qlora")) == [1, 2]
  qcfg, qmerged = load_params(tmp_path / "qlora")
  assert qcfg.model.lora.base_quant == "none" and qcfg.model.lora.rank == 0
  up = base["layers"]["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(qmerged["layers"]["mlp"]["up"]["kernel"],
                             np.stack([_numpy_nf4(layer) for layer in up]), rtol=1e-5, atol=1e-7)


def _numpy_nf4(w, block=64):
  """Nearest NF4 level of w / absmax per block of the first axis, times absmax."""
  w = np.asarray(w, np.float64)
  out = np.empty_like(w)
  for start in range(0, w.shape[0], block):
    part = w[start:start + block]
    absmax = np.abs(part).max(axis=0, keepdims=True)
    idx = np.abs(part[..., None] / absmax[..., None] - quant.NF4_LEVELS).argmin(-1)
    out[start:start + block] = quant.NF4_LEVELS[idx] * absmax
  return out


def test_int8_and_nf4_round_trips_match_numpy():
  w = np.asarray(jax.random.normal(jax.random.key(0), (128, 6, 8)) * 0.05)
  q, scale = quant.quantize(w, "int8", n_in=1)
  assert q.dtype == jnp.int8 and scale.shape == (6, 8)
  back = np.asarray(quant.dequantize(q, scale, "int8", 1, jnp.float32))
  ref_scale = np.abs(w).max(axis=0) / 127
  np.testing.assert_allclose(back, np.clip(np.round(w / ref_scale), -127, 127) * ref_scale,
                             rtol=1e-5, atol=1e-7)
  q, scale = quant.quantize(w, "nf4", n_in=1)
  assert q.dtype == jnp.uint8 and q.shape == (64, 6, 8) and scale.shape == (2, 6, 8)
  np.testing.assert_allclose(quant.dequantize(q, scale, "nf4", 1, jnp.float32), _numpy_nf4(w),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", [pytest.param("int8", marks=pytest.mark.slow), "nf4"])
def test_qlora_model_is_the_dequantized_base_plus_adapters(kind):
  base_cfg, lora_cfg, base_params, _ = _models()
  lora_cfg.model.lora.base_quant = kind
  config_lib.validate(lora_cfg)
  qparams = unbox(init_params(make_model(lora_cfg.model), jax.random.key(5), 8))
  _, adapters = lora.split(qparams)
  quantized = quant.quantize_base(base_params, kind)
  assert jax.tree.structure(lora.split(qparams)[0]) == jax.tree.structure(quantized)
  params = lora.join(quantized, adapters)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 if path[-1].key == "lora_b" else x, params)
  batch = _batch(base_cfg)
  qlogits = _logits(lora_cfg.model, params, batch)
  merged, merged_cfg = lora.merge(params, lora_cfg.model)
  assert merged_cfg.lora.base_quant == "none"
  np.testing.assert_allclose(_logits(merged_cfg, merged, batch), qlogits, atol=5e-5)
  # and close to the float model: the quantization error is small
  float_logits = _logits(_float_cfg(lora_cfg), lora.join(base_params, lora.split(params)[1]),
                         batch)
  assert np.max(np.abs(qlogits - float_logits)) < (0.05 if kind == "int8" else 0.5)


def _float_cfg(cfg):
  out = tiny_config()
  out.model.update(cfg.model.to_dict())
  out.model.lora.base_quant = "none"
  return out.model


def _float_cfg_lora(cfg, dropout):
  out = tiny_config()
  out.model.update(cfg.model.to_dict())
  out.model.lora.dropout = dropout
  return out.model
