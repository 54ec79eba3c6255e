"""Mixture-of-experts layers against a per-token NumPy reference (forward) and a dense
every-expert JAX reference (gradients); recipes' parameter counts; a short training run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm.model import forward, init_params, make_model, unbox
from llm.model.moe import load_balance_loss, route
from llm.ops.moe import COMPUTE, capacity
from llm.params import active_params, count_params
from llm.train import train
from tests.helpers import load_recipe, losses, tiny_config


def _weights(seed=0, n=24, d=16, f=12, e=4):
  ks = jax.random.split(jax.random.key(seed), 5)
  return (jax.random.normal(ks[0], (n, d)), 0.5 * jax.random.normal(ks[1], (d, e)),
          0.3 * jax.random.normal(ks[2], (e, d, f)), 0.3 * jax.random.normal(ks[3], (e, d, f)),
          0.3 * jax.random.normal(ks[4], (e, f, d)))


def _numpy_moe(x, router, gate, up, down, k, norm):
  """Token by token: softmax router, top k, each chosen expert's SwiGLU, weighted sum."""
  x, router, gate, up, down = (np.asarray(a, np.float64) for a in (x, router, gate, up, down))
  out = np.zeros_like(x)
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  for i, token in enumerate(x):
    logits = token @ router
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs, kind="stable")[:k]
    w = probs[chosen] / (probs[chosen].sum() if norm else 1.0)
    for weight, j in zip(w, chosen):
      out[i] += weight * ((silu(token @ gate[j]) * (token @ up[j])) @ down[j])
  return out


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("compute", ["dropless", "megablox", "capacity"])
def test_moe_matches_per_token_reference(compute, norm):
  x, router, gate, up, down = _weights()
  k = 2
  _, _, weights, experts = route(x, router, _settings(k, norm))
  extra = {"capacity_factor": 4.0} if compute == "capacity" else {}  # room for everyone
  fn = COMPUTE[compute]  # megablox: the Pallas TPU kernel in the interpreter
  out, dropped = fn(x, weights, experts, gate, up, down, jnp.float32, **extra)
  np.testing.assert_allclose(out, _numpy_moe(x, router, gate, up, down, k, norm), rtol=2e-5,
                             atol=2e-5)
  assert float(dropped) == 0.0

  def loss(fn_, x, router, gate, up, down):
    _, _, w, ex = route(x, router, _settings(k, norm))
    return jnp.sum(jnp.sin(fn_(x, w, ex, gate, up, down)))

  ours = jax.grad(lambda *a: loss(lambda *b: fn(*b, jnp.float32, **extra)[0], *a),
                  argnums=(0, 1, 2, 3, 4))(x, router, gate, up, down)
  ref = jax.grad(lambda *a: loss(_dense_moe, *a), argnums=(0, 1, 2, 3, 4))(
      x, router, gate, up, down)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _settings(top_k: int, norm: bool):
  """model.moe with a softmax router choosing top_k (renormalised if `norm`)."""
  from llm.config import base_config
  moe = base_config().model.moe
  moe.update(top_k=top_k, norm_topk_prob=norm)
  return moe


def _dense_moe(x, weights, experts, gate, up, down):
  """Every expert on every token, masked to the chosen: a differentiable reference."""
  full = jnp.einsum("nd,edf->enf", x, gate)
  y = jnp.einsum("enf,efd->end", jax.nn.silu(full) * jnp.einsum("nd,edf->enf", x, up), down)
  mix = jnp.sum(jax.nn.one_hot(experts, gate.shape[0]) * weights[..., None], axis=1)
  return jnp.einsum("ne,end->nd", mix, y)


def test_capacity_drops_overflow_slot_major_in_token_order():
  """Assignments are served first slot first (every token's top choice), then in token
  order; an expert's assignments past its capacity are dropped."""
  x, router, gate, up, down = _weights(n=32)
  _, _, weights, experts = route(x, router, _settings(2, True))
  out, dropped = capacity(x, weights, experts, gate, up, down, jnp.float32, capacity_factor=0.5)
  cap = int(np.ceil(0.5 * 32 * 2 / 4))
  kept_weights = np.zeros((32, 2), np.float32)
  used = np.zeros(4, int)
  for slot in range(2):
    for token in range(32):
      j = int(experts[token, slot])
      if used[j] < cap:
        used[j] += 1
        kept_weights[token, slot] = weights[token, slot]
  expected = _dense_moe(x, jnp.asarray(kept_weights), experts, gate, up, down)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert float(dropped) == pytest.approx(float((kept_weights == 0).mean()))
  assert 0 < float(dropped) < 1


def test_load_balance_loss_is_switch_form():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (10, 4)), -1)
  _, experts = jax.lax.top_k(probs, 2)
  f = np.bincount(np.asarray(experts).reshape(-1), minlength=4) / 10
  expected = 4 * np.sum(f * np.asarray(probs).mean(0))
  assert float(load_balance_loss(probs, experts)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name,total,active", [
    ("mixtral_8x7b", 46_702_792_704, 12_879_925_248),
    ("qwen3_30b_a3b", 30_532_122_624, 3_353_032_704),
])
def test_moe_recipes_have_published_counts(name, total, active):
  cfg = load_recipe(name)
  config_lib.validate(cfg)
  assert count_params(cfg.model) == total
  assert active_params(cfg.model) == active


def test_moe_config_errors():
  cfg = tiny_config()
  cfg.model.mlp = "moe"
  cfg.model.moe.update(n_experts=4, top_k=5)
  with pytest.raises(ValueError, match=r"model.moe.top_k=5 must be in \[1, 4\]"):
    config_lib.validate(cfg)
  cfg.model.moe.update(top_k=2, compute="magic")
  with pytest.raises(ValueError, match="model.moe.compute='magic' is not allowed"):
    config_lib.validate(cfg)


def _moe_config(config):
  config.model.update(mlp="moe")
  config.model.moe.update(n_experts=4, top_k=2, d_ff=32)
  return config


def test_expert_parallel_training_matches_one_device_and_restores_across_layouts(config,
                                                                                  tmp_path):
  """A tiny MoE on 8 devices with expert=4 x data=2, then resumed on expert=2 x fsdp=2 x
  tensor=2, gives the losses of a 1-device run (dropless experts, all-to-all by gather
  and reduce-scatter inside shard_map)."""
  config = _moe_config(config)
  config.train.update(steps=6, checkpoint_every=3, eval_every=3)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.mesh.update(data=2, expert=4)
  config.train.steps = 3
  train(config, tmp_path / "ep")
  config.mesh.update(data=1, expert=2, fsdp=2, tensor=2)
  config.train.steps = 6
  train(config, tmp_path / "ep")
  one, ep = losses(tmp_path / "one"), losses(tmp_path / "ep")
  assert sorted(ep) == list(range(1, 7))
  np.testing.assert_allclose([ep[s] for s in one], [one[s] for s in one], rtol=2e-5)


def test_moe_trains_logs_aux_losses_and_all_to_all_matches_one_device(config, tmp_path):
  """A MoE (capacity compute, a shared expert) trains on one device and logs its aux
  losses; with experts over expert=4 (tokens sent by all-to-all) it gives the same losses
  when the capacity drops nothing (capacity_factor = n_experts / top_k)."""
  config = _moe_config(config)
  config.model.moe.update(compute="capacity", capacity_factor=2.0, n_shared=1)
  config.train.update(steps=4, checkpoint_every=4, eval_every=4)
  model = make_model(config.model)
  params = unbox(init_params(model, jax.random.key(0), 8))
  batch = {"inputs": jnp.ones((2, 8), jnp.int32), "segment_ids": jnp.ones((2, 8), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(8), (2, 8))}
  _, aux = forward(model, params, batch)
  assert set(aux.losses) == {"moe_load_balance_loss", "moe_router_z_loss"}
  assert set(aux.metrics) == {"moe_load_min_over_max", "moe_dropped_fraction"}
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
  first = next(r for r in records if "loss" in r)
  assert first["moe_load_balance_loss"] > 0 and 0 <= first["moe_load_min_over_max"] <= 1
  one = losses(tmp_path / "one")
  assert sorted(one) == [1, 2, 3, 4] and one[4] < one[1]
  config.mesh.update(data=2, expert=4)
  train(config, tmp_path / "ep")
  ep = losses(tmp_path / "ep")
  np.testing.assert_allclose([ep[s] for s in one], [one[s] for s in one], rtol=2e-5)
  record = next(json.loads(line) for line in open(tmp_path / "ep" / "metrics.jsonl")
                if "moe_dropped_fraction" in line)
  assert record["moe_dropped_fraction"] == 0.0


def test_expert_parallelism_needs_divisible_experts(config, tmp_path):
  config = _moe_config(config)
  config.mesh.update(data=2, expert=4)
  config.model.moe.update(n_experts=6)
  with pytest.raises(ValueError, match="model.moe.n_experts=6 must be divisible by mesh.expert=4"):
    train(config, tmp_path / "b")


def _mixed_config(scan: bool):
  cfg = tiny_config()
  cfg.model.update(mlp="moe", n_layers=4, scan_layers=scan, remat="none")
  cfg.model.moe.update(n_experts=4, top_k=2, d_ff=16, every=2, compute="capacity")
  config_lib.validate(cfg)
  return cfg


def test_every_nth_layer_moe_has_dense_layers_between():
  """moe.every=2: layers 1 and 3 are MoE, 0 and 2 dense; scanned in groups of two, the
  same function as the unscanned model with the same weights; counts add up."""
  cfg = _mixed_config(scan=True)
  params = unbox(init_params(make_model(cfg.model), jax.random.key(0), 8))
  groups = params["layers"]
  assert set(groups) == {"block_0", "block_1"}
  assert "router" in groups["block_1"]["mlp"] and "router" not in groups["block_0"]["mlp"]
  assert groups["block_0"]["mlp"]["gate"]["kernel"].shape[0] == 2  # 4 layers / groups of 2
  flat_cfg = _mixed_config(scan=False)
  flat = {k: v for k, v in params.items() if k != "layers"}
  for i in range(4):
    flat[f"layers_{i}"] = jax.tree.map(lambda a: a[i // 2], groups[f"block_{i % 2}"])
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.model.vocab_size)
  batch = {"inputs": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(8), (2, 8))}
  scanned, aux = forward(make_model(cfg.model), params, batch)
  unrolled, _ = forward(make_model(flat_cfg.model), flat, batch)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
  assert set(aux.losses) == {"moe_load_balance_loss", "moe_router_z_loss"}
  routed_experts_per_layer = 4 * 3 * cfg.model.d_model * 16
  inactive = 2 * routed_experts_per_layer * (1 - 2 / 4)  # two MoE layers, top 2 of 4 experts
  assert count_params(cfg.model) - active_params(cfg.model) == inactive
  bad = tiny_config()
  bad.model.update(mlp="moe", n_layers=4)
  bad.model.moe.every = 3
  with pytest.raises(ValueError, match=r"model.n_layers=4 \(less moe.first_dense\) is not a "
                     "multiple of 3"):
    config_lib.validate(bad)


def test_megablox_on_an_fsdp_mesh_runs_per_device_and_matches_one_device():
  """The Pallas grouped matmul is not partitioned by GSPMD: on a data x FSDP mesh without
  an expert axis each device runs it on its own tokens with the experts gathered."""
  import ml_collections

  from llm.ops.moe import routed_experts
  from llm.parallel.mesh import make_mesh, use_mesh
  x, router, gate, up, down = _weights()
  x_BTD = x.reshape(4, -1, x.shape[-1])
  _, _, weights, experts = route(x, router, _settings(2, True))
  args = (x_BTD, weights.reshape(4, -1, 2), experts.reshape(4, -1, 2), gate, up, down)

  def loss(*a):
    out, _ = routed_experts("megablox", *a, jnp.float32, 1.0)
    return jnp.sum(jnp.sin(out)), out

  (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 3, 4, 5), has_aux=True)(*args)
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, expert=1, fsdp=2, tensor=1,
                                                  sequence=1)), jax.devices()[:4])
  with use_mesh(mesh):
    (_, got), got_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5),
                                                     has_aux=True))(*args)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
