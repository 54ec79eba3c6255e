"""Hugging Face interop: logits parity with transformers' Llama, exact round trips, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from llm import config as config_lib  # noqa: E402
from llm.workdir import load_params  # noqa: E402
from llm.convert import hf  # noqa: E402
from llm.convert.__main__ import hf_to_llm, llm_to_hf  # noqa: E402
from llm.model import make_model  # noqa: E402
from llm.train import train  # noqa: E402

VARIANTS = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_theta": dict(num_key_value_heads=1, rope_parameters={"rope_type": "default",
                                                              "rope_theta": 500000.0}),
    "llama3_scaling": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "linear_scaling": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    # positions up to 23 past max_position_embeddings=16: the base grows with the length
    "dynamic_ntk": dict(num_key_value_heads=2, max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 16.0, "beta_slow": 2.0}),
    "yarn_deepseek_mscale": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
        "mscale_all_dim": 0.5, "original_max_position_embeddings": 8}),
}


def _hf_model(out, vocab=128, **overrides):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{**dict(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5), **overrides})
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot hide
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  return model


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _our_logits(workdir, ids):
  config, params = load_params(workdir)
  return np.asarray(jax.jit(make_model(config.model).apply)({"params": params}, jnp.asarray(ids)))


def _tensors(hf_dir):
  out = {}
  for f in sorted(hf_dir.glob("*.safetensors")):
    out.update(load_file(f))
  return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers_and_round_trips(tmp_path, variant):
  model = _hf_model(tmp_path / "hf", **VARIANTS[variant])
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "ours"))
  ids = np.random.default_rng(0).integers(0, 128, (2, 24))
  ref = _hf_logits(model, ids)
  assert np.max(np.abs(_our_logits(tmp_path / "ours", ids) - ref)) <= 1e-4

  _check_round_trip(tmp_path, ids, ref)


def _check_round_trip(tmp_path, ids, ref):
  """ours -> HF gives back the imported tensors exactly, and transformers loads them."""
  llm_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
  assert sorted(before) == sorted(after)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  assert np.max(np.abs(_hf_logits(reloaded, ids) - ref)) <= 1e-5
  return reloaded


def test_sharded_checkpoints_are_written_and_read(tmp_path):
  model = _hf_model(tmp_path / "hf")
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "ours"))
  config, params = load_params(tmp_path / "ours")
  out = tmp_path / "sharded"
  out.mkdir()
  hf.write_safetensors(hf.params_to_hf(jax.device_get(params), config.model), out,
                       max_shard_bytes=50_000)
  (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  hf_to_llm(str(out), str(tmp_path / "again"))
  ids = np.random.default_rng(1).integers(0, 128, (1, 16))
  assert np.max(np.abs(_our_logits(tmp_path / "again", ids) - _hf_logits(model, ids))) <= 1e-4
  # A missing shard is named.
  victim = sorted(set(index["weight_map"].values()))[1]
  (out / victim).unlink()
  with pytest.raises(FileNotFoundError, match=f"missing safetensors shards.*{victim}"):
    hf_to_llm(str(out), str(tmp_path / "broken"))


def test_bad_inputs_are_named(tmp_path):
  _hf_model(tmp_path / "hf")
  cfg_path = tmp_path / "hf" / "config.json"
  good = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**good, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
    hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "o1"))
  cfg_path.write_text(json.dumps({**good, "intermediate_size": 100}))
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\) "
                                       r"but the config implies \(100, 64\)"):
    hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "o2"))
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    hf_to_llm(str(tmp_path / "nowhere"), str(tmp_path / "o3"))
  cfg_path.write_text(json.dumps(good))
  run = tmp_path / "a_run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"a_run' is a training run; hf-to-llm writes a new workdir"):
    hf_to_llm(str(tmp_path / "hf"), str(run))
  assert (run / "config.json").read_text() == "{}"
  weights = tmp_path / "hf" / "model.safetensors"
  whole = weights.read_bytes()
  for damaged in (whole[:len(whole) // 2], b"\x00garbage" * 10):
    weights.write_bytes(damaged)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file "
                                         r"\(.*\): it is truncated or damaged"):
      hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "o4"))
    assert not (tmp_path / "o4").exists()
  weights.write_bytes(whole)
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "o5"))  # params/ are sealed with a manifest
  victim = max((p for p in (tmp_path / "o5" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
  victim.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=rf"params checkpoint .* is damaged: .*{victim.name} does "
                                       r"not match its checksum"):
    load_params(tmp_path / "o5")


@pytest.mark.parametrize("change,message", [
    (dict(r=0), r"'r'=0 must be an integer >= 1"),
    (dict(layer=5), r"adapts layer 5, but the base model has 2 layers \(0..1\)"),
    (dict(n_in=48), r"has lora_A \[4, 48\] and lora_B \[64, 4\]; this base model and r=4 need "
                    r"\[4, 64\] and \[64, 4\]"),
])
def test_bad_peft_adapters_are_named(tmp_path, change, message):
  from safetensors.numpy import save_file
  c = config_lib.base_config().model
  c.update(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96)
  from llm.model import unbox
  from llm.params import abstract_params
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), unbox(abstract_params(c)))
  layer, n_in = change.get("layer", 0), change.get("n_in", 64)
  stem = f"{hf.PEFT_PREFIX}.{layer}.self_attn.q_proj"
  save_file({f"{stem}.lora_A.weight": np.ones((4, n_in), np.float32),
             f"{stem}.lora_B.weight": np.ones((64, 4), np.float32)},
            str(tmp_path / "adapter_model.safetensors"))
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": change.get("r", 4), "lora_alpha": 8}))
  with pytest.raises(ValueError, match=message):
    hf.merge_peft(params, c, tmp_path)


def test_fine_tuning_starts_from_converted_params(tmp_path, config):
  _hf_model(tmp_path / "hf", vocab=config.model.vocab_size, num_key_value_heads=2)
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "ours"))
  converted = config_lib.from_json((tmp_path / "ours" / "config.json").read_text())
  _, start = load_params(tmp_path / "ours")
  config.model.update(converted.model.to_dict())
  config.model.remat = "none"
  config.train.update(steps=1, init_params=converted.train.init_params)
  config.optim.update(lr=1e-9, warmup_steps=0)
  train(config, tmp_path / "ft", devices=jax.devices()[:1])
  _, tuned = load_params(tmp_path / "ft")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned, start)


def _hf_moe_model(out, family, **overrides):
  torch.manual_seed(0)
  common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
  if family == "mixtral":
    cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                     **{**common, **overrides})
    model = transformers.MixtralForCausalLM(cfg)
  else:
    common.update(intermediate_size=96, moe_intermediate_size=32, num_experts=4, head_dim=24,
                  decoder_sparse_step=1, mlp_only_layers=[])
    cfg = transformers.Qwen3MoeConfig(**{**common, **overrides})
    model = transformers.Qwen3MoeForCausalLM(cfg)
  model = model.eval()
  with torch.no_grad():  # decisive routers and non-trivial norms
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
      if name.endswith("gate.weight") and "experts" not in name:
        p.mul_(20.0)
  model.save_pretrained(out)
  return model


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {}),
    ("qwen3_moe", dict(norm_topk_prob=True)),
    ("qwen3_moe", dict(norm_topk_prob=False, tie_word_embeddings=True)),
    ("qwen3_moe", dict(decoder_sparse_step=2, num_hidden_layers=4)),  # dense, moe, dense, moe
])
def test_moe_import_matches_transformers_and_round_trips(tmp_path, family, overrides):
  model = _hf_moe_model(tmp_path / "hf", family, **overrides)
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "ours"))
  config = config_lib.from_json((tmp_path / "ours" / "config.json").read_text())
  assert config.model.mlp == "moe" and config.model.moe.n_experts == 4
  ids = np.random.default_rng(0).integers(0, 128, (2, 24))
  ref = _hf_logits(model, ids)
  assert np.max(np.abs(_our_logits(tmp_path / "ours", ids) - ref)) <= 1e-4

  reloaded = _check_round_trip(tmp_path, ids, ref)
  assert type(reloaded).__name__ == type(model).__name__


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_dense_imports_like_transformers_and_round_trips(tmp_path, family):
  """Qwen2ForCausalLM (Llama with q/k/v biases) and Qwen3ForCausalLM (Llama with QK-norm
  and an explicit head_dim): logits within 1e-4 of transformers, and exported back as
  the same architecture with the same tensors and logits."""
  torch.manual_seed(0)
  common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  if family == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
  else:
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=24)).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf")
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "ours"))
  config = config_lib.from_json((tmp_path / "ours" / "config.json").read_text())
  assert config.model.qk_norm == (family == "qwen3") and config.model.mlp == "dense"
  assert config.model.qkv_bias == (family == "qwen2")
  ids = np.random.default_rng(0).integers(0, 128, (2, 24))
  ref = _hf_logits(model, ids)
  assert np.max(np.abs(_our_logits(tmp_path / "ours", ids) - ref)) <= 1e-4
  reloaded = _check_round_trip(tmp_path, ids, ref)
  assert type(reloaded).__name__ == type(model).__name__
  from llm.inference.decoder import Decoder  # the cached path, out-major kernels on a CPU
  from llm.inference.sampling import SamplingParams
  config, params = load_params(tmp_path / "ours")
  prompt = ids[0, :9].tolist()
  hf_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)[0, 9:].tolist()
  ours = Decoder(config.model, params).generate([prompt], 6, SamplingParams(temperature=0))
  assert list(ours[0]) == hf_tokens


def test_lora_run_exports_a_peft_adapter_and_imports_one(tmp_path, config):
  """A LoRA run on a converted Llama: `llm-to-hf --peft` writes an adapter that peft loads
  onto the transformers base with our merged model's logits; `hf-to-llm --peft_dir`
  folds the same adapter into imported weights."""
  peft = pytest.importorskip("peft")
  model = _hf_model(tmp_path / "hf", vocab=config.model.vocab_size, num_key_value_heads=2)
  ids = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 16))
  base_logits = _hf_logits(model, ids)
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "base"))
  converted = config_lib.from_json((tmp_path / "base" / "config.json").read_text())
  config.model.update(converted.model.to_dict())
  config.model.update(remat="none")
  config.model.lora.update(rank=4, alpha=8.0, targets="q,k,v,o,gate,up,down")
  config.train.update(steps=2, checkpoint_every=2, eval_every=2,
                      init_params=converted.train.init_params)
  config.optim.update(lr=2e-2, warmup_steps=0)
  train(config, tmp_path / "lora", devices=jax.devices()[:1])
  llm_to_hf(str(tmp_path / "lora"), str(tmp_path / "peft"), peft=True)
  adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert adapter_config["r"] == 4 and len(adapter_config["target_modules"]) == 7
  ref = _hf_logits(peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval(), ids)
  assert np.max(np.abs(ref - base_logits)) > 1e-3  # the adapters changed the model
  assert np.max(np.abs(_our_logits(tmp_path / "lora", ids) - ref)) <= 1e-4
  hf_to_llm(str(tmp_path / "hf"), str(tmp_path / "imported"), peft_dir=str(tmp_path / "peft"))
  assert np.max(np.abs(_our_logits(tmp_path / "imported", ids) - ref)) <= 1e-4
