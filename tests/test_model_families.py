"""Gemma 2 and Gemma 3 against transformers: logits (1e-4, fp32), exact round trips, and the
cached decoder's and the serving engine's greedy tokens equal `generate`'s; the flash
kernels' soft-capping against the reference, and Gemma trained with attention=flash."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llm import config as config_lib  # noqa: E402
from llm.convert.__main__ import hf_to_llm  # noqa: E402
from llm.inference.decoder import Decoder  # noqa: E402
from llm.inference.sampling import SamplingParams  # noqa: E402
from llm.model import make_model  # noqa: E402
from llm.serve.engine import Engine  # noqa: E402
from llm.serve.request import SamplingOptions  # noqa: E402
from llm.workdir import load_params  # noqa: E402
from tests.test_convert import _check_round_trip, _hf_logits, _our_logits  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=64)


def _gemma(family):
  torch.manual_seed(0)
  if family == "gemma2":  # local/global alternating, both soft-caps, a query scalar != head dim
    cfg = transformers.Gemma2Config(num_hidden_layers=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    **COMMON)
    model = transformers.Gemma2ForCausalLM(cfg)
  else:  # 5 local : 1 global over 7 layers (not scannable), own RoPE bases, linear scaling
    cfg = transformers.Gemma3TextConfig(
        num_hidden_layers=7, query_pre_attn_scalar=16, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **COMMON)
    model = transformers.Gemma3ForCausalLM(cfg)
  with torch.no_grad():  # non-trivial norms; weights large enough that both caps bite
    for name, p in model.named_parameters():
      p.add_(0.3 * torch.randn_like(p)) if "norm" in name else p.mul_(3.0)
  return model.eval()


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma(request, tmp_path_factory):
  tmp = tmp_path_factory.mktemp(request.param)
  model = _gemma(request.param)
  model.save_pretrained(tmp / "hf")
  hf_to_llm(str(tmp / "hf"), str(tmp / "ours"))
  return request.param, model, tmp


def test_gemma_imports_like_transformers_and_round_trips(gemma):
  family, model, tmp = gemma
  m = config_lib.from_json((tmp / "ours" / "config.json").read_text()).model
  assert (m.norm_plus_one, m.post_norms, m.embed_scale, m.mlp_activation) == (
      True, True, True, "gelu_tanh")
  if family == "gemma2":
    assert (m.sliding_window_pattern, m.attn_logit_softcap, m.final_logit_softcap) == (2, 2.0, 3.0)
    assert m.scan_layers and not m.qk_norm
  else:
    assert (m.sliding_window_pattern, m.rope_local_theta, m.rope_scaling.type) == (6, 1e4, "linear")
    assert m.qk_norm and not m.scan_layers  # 7 layers: no whole number of 6-layer units
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
  ref = _hf_logits(model, ids)
  ours = _our_logits(tmp / "ours", ids)
  assert np.max(np.abs(ours - ref)) <= 1e-4
  if family == "gemma2":  # the final cap is in force
    assert np.max(np.abs(ref)) > 0.5 * 3.0
  reloaded = _check_round_trip(tmp, ids, ref)
  assert type(reloaded).__name__ == type(model).__name__


def test_gemma_decoder_and_engine_greedy_tokens_equal_transformers(gemma):
  """Past the window, so the local layers' cache masks matter (dense cache and pages)."""
  _, model, tmp = gemma
  config, params = load_params(tmp / "ours")
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, VOCAB, n).tolist() for n in (9, 3)]
  n = 8
  want = [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
  ours = Decoder(config.model, params).generate(prompts, n, SamplingParams(temperature=0))
  assert [list(t) for t in ours] == want
  engine = Engine(config.model, params, page_size=4, num_pages=16, max_num_batched_tokens=16,
                  max_num_seqs=2, max_model_len=32, buckets=(16,), warm_up=False)
  outs = engine.generate(prompts, [SamplingOptions(max_tokens=n, temperature=0.0)] * 2)
  assert [o.outputs[0].token_ids for o in outs] == want


@pytest.mark.parametrize("window", [None, 5])
def test_flash_kernel_soft_caps_like_the_reference(window):
  """Forward and gradients of the Triton kernel (interpreted) and the XLA chunks with a
  soft-cap equal plain attention with capped logits; without the cap they would not."""
  import pallas_kernels.flash_attention as flash
  from llm.ops.attention.xla import xla_attention
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(4 * rng.standard_normal((1, 24, h, 16)), jnp.float32)
             for h in (4, 2, 2))
  seg = jnp.asarray([[1] * 15 + [2] * 9])
  do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v) * do)

  def ref(q, k, v, cap=1.5):
    return flash.reference_attention(q, k, v, seg, window=window, softcap=cap)[0]

  kernel = lambda q, k, v: flash.flash_attention(q, k, v, seg, window=window, softcap=1.5,  # noqa: E731
                                                 block_q=16, block_k=16)
  chunks = lambda q, k, v: xla_attention(q, k, v, seg, window, softcap=1.5)  # noqa: E731
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for f in (kernel, chunks):
    np.testing.assert_allclose(f(q, k, v), ref(q, k, v), atol=2e-5)
    for got, w in zip(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v), want):
      np.testing.assert_allclose(got, w, atol=2e-4)
  assert np.max(np.abs(ref(q, k, v, None) - ref(q, k, v))) > 0.1


def test_gemma2_trains_with_flash_attention_like_xla(tmp_path):
  """A tiny Gemma 2 shape (local/global layers, both caps, post-norms, GeGLU): one train
  step's loss and gradients with the flash kernel equal those with XLA attention."""
  from llm.model.transformer import init_params, target_nll, unbox
  cfg = config_lib.load_config("gemma2_9b", {
      "model.vocab_size": VOCAB, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
      "model.n_kv_heads": 1, "model.head_dim": 16, "model.d_ff": 48, "model.sliding_window": 6,
      "model.query_pre_attn_scalar": 16.0, "model.attn_logit_softcap": 1.0})
  params = unbox(init_params(make_model(cfg.model), jax.random.key(0)))
  params = jax.tree.map(lambda p: p * 4.0, params)  # logits that the caps bite
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 17)))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((2, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}

  def loss(attention):
    m = config_lib.load_config("gemma2_9b", {**{f"model.{k}": v for k, v in cfg.model.items()
                                                if not isinstance(v, dict)},
                                             "model.attention": attention}).model
    return lambda p: jnp.mean(target_nll(make_model(m), p, batch, chunk_len=0)[0])

  (l_xla, g_xla), (l_flash, g_flash) = (jax.value_and_grad(loss(a))(params)
                                        for a in ("xla", "flash"))
  np.testing.assert_allclose(l_flash, l_xla, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name", ["gemma2_9b", "gemma3_12b", "qwen2.5_7b", "deepseek_v3"])
def test_recipes_count_what_transformers_builds(name):
  """The recipe, exported as an HF config and built by transformers on the meta device,
  stores as many values as llm.params counts (its state dict: DeepSeek's routing biases
  are buffers there), and as many go through one token (routed experts: k of n)."""
  from llm.convert.hf import hf_config_from_model
  from llm.params import active_params, count_params
  from tests.helpers import load_recipe
  cfg = load_recipe(name)
  config_lib.validate(cfg)
  hf_cfg = hf_config_from_model(cfg.model, max_position=cfg.data.seq_len)
  config = transformers.AutoConfig.for_model(**hf_cfg)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
  assert type(model).__name__ == hf_cfg["architectures"][0]
  stored = model.state_dict().keys()  # persistent buffers too; tied weights once
  total = (sum(p.numel() for p in model.parameters()) +
           sum(b.numel() for n, b in model.named_buffers() if n in stored))
  routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
  m = cfg.model.moe
  inactive = 0 if cfg.model.mlp != "moe" else routed * (1 - m.top_k / m.n_experts)
  assert count_params(cfg.model) == total
  assert active_params(cfg.model) == int(total - inactive)


def _deepseek():
  torch.manual_seed(0)
  cfg = transformers.DeepseekV3Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
      n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
      qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=12, n_group=4, topk_group=2,
      num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 16, "mscale": 1.0,
                       "mscale_all_dim": 0.8})
  model = transformers.DeepseekV3ForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norms; routing biases that change the choice
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
      elif "gate.weight" in name:
        p.mul_(20.0)
    for layer in model.model.layers[1:]:
      layer.mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(8))
  return model


def test_deepseek_v3_imports_round_trips_and_decodes_from_the_latent(tmp_path):
  """MLA (low-rank q, latent kv, interleaved RoPE rows, YaRN with DeepSeek's mscale), a
  dense first layer, then a sigmoid router over expert groups with its bias, scaled
  weights and a shared expert: logits within 1e-4 of transformers, an exact round trip,
  and greedy tokens equal to `generate`'s from the absorbed decode path, whose cache (the
  Decoder's and the engine's pages) holds one latent + RoPE-key vector per token."""
  model = _deepseek()
  model.save_pretrained(tmp_path / "hf")
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "ours"))
  config, params = load_params(tmp_path / "ours")
  m = config.model
  assert (m.mla.kv_lora_rank, m.moe.router, m.moe.first_dense, m.moe.n_groups) == (16, "sigmoid",
                                                                                  1, 4)
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
  ref = _hf_logits(model, ids)
  assert np.max(np.abs(_our_logits(tmp_path / "ours", ids) - ref)) <= 1e-4
  reloaded = _check_round_trip(tmp_path, ids, ref)
  assert type(reloaded).__name__ == "DeepseekV3ForCausalLM"

  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, VOCAB, n).tolist() for n in (9, 3)]
  n = 8
  want = [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
  decoder = Decoder(m, params)
  cache = decoder.init_cache(2, 32)
  assert set(jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, dict))[0]) == {"k"}
  assert jax.tree.leaves(cache)[0].shape[-3:] == (1, 32, 16 + 8)
  assert [list(t) for t in decoder.generate(prompts, n, SamplingParams(temperature=0))] == want
  engine = Engine(m, params, page_size=4, num_pages=16, max_num_batched_tokens=16,
                  max_num_seqs=2, max_model_len=32, buckets=(16,), warm_up=False)
  assert engine.runner.pages[0]["kv"].shape[2:] == (1, 16 + 8)
  outs = engine.generate(prompts, [SamplingOptions(max_tokens=n, temperature=0.0)] * 2)
  assert [o.outputs[0].token_ids for o in outs] == want


def test_balancing_bias_follows_the_load_and_escapes_weight_decay(config, tmp_path):
  """Auxiliary-loss-free balancing. One MoE layer's sown correction is
  rate x sign(mean load - load) for the load a NumPy router gives; a run moves every
  bias by exactly that each step, after the optimizer: two steps with weight decay leave
  whole multiples of the rate (decay would shave them)."""
  from llm.model.layers import AUX_UPDATES
  from llm.model.moe import MoE
  from llm.model.transformer import unbox
  from llm.train import train
  rate = 0.01
  config.model.update(mlp="moe", n_heads=4, n_kv_heads=4, head_dim=24)
  config.model.mla.update(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16)
  config.model.moe.update(n_experts=4, top_k=2, d_ff=32, router="sigmoid", first_dense=1,
                          load_balance_weight=0.0, router_z_weight=0.0,
                          routed_bias_update_rate=rate)

  layer = MoE(config.model, out_init_std=0.02)
  x = jax.random.normal(jax.random.key(1), (2, 16, 64))
  variables = layer.init(jax.random.key(0), x)
  params = dict(unbox(variables["params"]))
  params["router_bias"] = jnp.asarray([0.3, -0.2, 0.0, 0.1])
  _, sown = layer.apply({"params": params}, x, mutable=[AUX_UPDATES])
  scores = 1 / (1 + np.exp(-(np.asarray(x).reshape(-1, 64) @ np.asarray(params["router"]))))
  chosen = np.argsort(-(scores + np.asarray(params["router_bias"])), axis=-1)[:, :2]
  load = np.bincount(chosen.ravel(), minlength=4)
  np.testing.assert_array_equal(sown[AUX_UPDATES]["router_bias"][0],
                                np.float32(rate) * np.sign(load.mean() - load).astype(np.float32))

  config.train.update(steps=2, eval_every=2, checkpoint_every=2)
  config.optim.update(weight_decay=0.5, warmup_steps=0)
  train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  _, trained = load_params(tmp_path / "run")
  bias = np.asarray(trained["layers"]["mlp"]["router_bias"])  # [1 MoE layer, 4]
  steps = bias / rate
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
  assert np.all(np.abs(steps) <= 2) and np.any(bias != 0)


def test_multi_token_prediction_trains_beside_the_trunk_without_changing_it(config, tmp_path):
  """model.mtp_layers adds training-only heads: the trunk's logits are those of the same
  params without them; `mtp_loss` is logged and falls while training; a target outside
  its document is not counted (the loss is finite on rows of one-token documents)."""
  from llm.model.layers import AUX_LOSSES
  from llm.model.transformer import init_params, unbox
  from llm.train import train
  from tests.helpers import losses
  config.model.update(mtp_layers=2, mtp_loss_weight=1.0)
  model = make_model(config.model)
  params = unbox(init_params(model, jax.random.key(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)))
  logits, sown = model.apply({"params": params}, tokens, mutable=[AUX_LOSSES])
  plain_cfg = config.model.copy_and_resolve_references()
  plain_cfg.mtp_layers = 0
  plain = {k: v for k, v in params.items() if k != "mtp"}
  np.testing.assert_array_equal(logits, make_model(plain_cfg).apply({"params": plain}, tokens))
  mtp = float(sown[AUX_LOSSES]["mtp"]["mtp_loss"][0])
  assert abs(mtp - np.log(512)) < 0.5  # two heads near uniform at init
  segments = jnp.broadcast_to(jnp.arange(1, 17), (2, 16))  # every token its own document
  _, sown = model.apply({"params": params}, tokens, segments, jnp.zeros((2, 16), jnp.int32),
                        mutable=[AUX_LOSSES])
  assert float(sown[AUX_LOSSES]["mtp"]["mtp_loss"][0]) == 0.0

  config.train.update(steps=15, log_every=1, eval_every=15, checkpoint_every=15)
  train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  import json
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  mtp_losses = [r["mtp_loss"] for r in records if "mtp_loss" in r and "eval_loss" not in r]
  assert len(mtp_losses) >= 14 and np.mean(mtp_losses[-3:]) < np.mean(mtp_losses[:3]) - 0.3
  assert losses(tmp_path / "run")
