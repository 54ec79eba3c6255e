"""llm.merge against mergekit (run on the same small random Llama models): every tensor of
every method, with per-model and filtered / gradient parameters; workdir inputs; refusals."""

import json

import numpy as np
import pytest

from llm.merge import merge, parse_config, random_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402


def _content_mask(delta: np.ndarray, density: float) -> np.ndarray:
  """A deterministic stand-in for DARE's random draws, from the values themselves, so that
  mergekit and llm.merge drop the same entries."""
  return ((np.abs(delta.astype(np.float64)) * 1e6) % 1.0 < density).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A random base and two 'fine-tunes' of it (base + task vectors), as HF directories."""
  root = tmp_path_factory.mktemp("merge")
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(cfg)
  paths = {"base": root / "base"}
  base.save_pretrained(paths["base"])
  for i, name in enumerate(("a", "b")):
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(i + 1)
    with torch.no_grad():
      for (n, p), (_, p0) in zip(model.named_parameters(), base.named_parameters()):
        p.copy_(p0 + 0.05 * torch.randn(p.shape, generator=g))
    paths[name] = root / name
    model.save_pretrained(paths[name])
  return paths


def _run_mergekit(yaml_text: str, out):
  config = MergeConfiguration.model_validate(__import__("yaml").safe_load(yaml_text))
  mergekit_merge.run_merge(config, str(out), MergeOptions(copy_tokenizer=False, quiet=True,
                                                          write_model_card=False))
  return _tensors(out)


def _tensors(directory) -> dict:
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(load_file(f))
  return out


CONFIGS = {
    "linear": """
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.7}}}}
  - {{model: {b}, parameters: {{weight: [0.1, 0.9]}}}}
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {a}}}]
parameters:
  t:
    - {{filter: self_attn, value: [0.0, 0.5, 1.0]}}
    - {{filter: mlp, value: [1.0, 0.5, 0.0]}}
    - {{value: 0.3}}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6}}}}
  - {{model: {b}, parameters: {{weight: [{{filter: down_proj, value: 0.2}}, {{value: 0.4}}]}}}}
parameters: {{lambda: 0.8}}
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: [0.2, 0.8]}}}}
""",
    "dare_linear": """
merge_method: dare_linear
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.5, density: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.7}}}}
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.3, density: 0.5}}}}
parameters: {{normalize: true}}
""",
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_tensor_equals_mergekits(method, models, tmp_path, monkeypatch):
  text = CONFIGS[method].format(**{k: str(v) for k, v in models.items()})
  # DARE's draws: the same entries dropped on both sides (mergekit rescales as it does)
  monkeypatch.setattr(mk_sparsify, "bernoulli", lambda tensor, density, rescale_norm=None:
                      mk_sparsify.rescaled_masked_tensor(
                          tensor, torch.from_numpy(_content_mask(tensor.numpy(), density)),
                          rescale_norm))
  theirs = _run_mergekit(text, tmp_path / "mergekit")
  merge(parse_config(text), tmp_path / "ours", tmp_path / "ours_hf",
        mask_fn=lambda name, index, delta, density: _content_mask(delta, density))
  ours = _tensors(tmp_path / "ours_hf")
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
  if method == "slerp":  # the filters and gradients did select: attention from base to a
    base = _tensors(models["base"])
    np.testing.assert_allclose(ours["model.layers.0.self_attn.q_proj.weight"],
                               base["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)
  # the workdir loads and answers as the HF directory does
  from llm.workdir import load_params
  config, params = load_params(tmp_path / "ours")
  np.testing.assert_allclose(np.asarray(params["embedding"]),
                             ours["model.embed_tokens.weight"], atol=1e-6)
  assert config.model.n_layers == 3


def test_dare_draws_keep_the_density_and_workdirs_merge_as_their_hf_directories(models,
                                                                                tmp_path):
  mask = random_mask(0, "model.layers.1.mlp.up_proj.weight", 1, (400, 500), 0.3)
  assert abs(mask.mean() - 0.3) < 0.01
  assert not np.array_equal(mask, random_mask(0, "model.layers.2.mlp.up_proj.weight", 1,
                                              (400, 500), 0.3))
  np.testing.assert_array_equal(mask, random_mask(0, "model.layers.1.mlp.up_proj.weight", 1,
                                                  (400, 500), 0.3))
  from llm.convert import hf_to_llm
  from llm.workdir import Workdir
  hf_to_llm(str(models["a"]), str(tmp_path / "a_wd"))
  a_wd = Workdir(tmp_path / "a_wd")
  a_config = a_wd.read_config()
  a_config.data.chat.template = "chatml"  # a fine-tune's chat settings carry to the merge
  a_wd.write_config(a_config)
  text = "merge_method: dare_ties\nbase_model: {base}\nmodels:\n" \
         "  - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}\n" \
         "  - {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
  from_hf = merge(parse_config(text.format(base=models["base"], a=models["a"], b=models["b"])),
                  tmp_path / "m1", tmp_path / "m1_hf", seed=3)
  merge(parse_config(text.format(base=models["base"], a=tmp_path / "a_wd", b=models["b"])),
        tmp_path / "m2", tmp_path / "m2_hf", seed=3)
  assert from_hf == tmp_path / "m1"
  assert Workdir(tmp_path / "m2").read_config().data.chat.template == "chatml"
  assert Workdir(tmp_path / "m1").read_config().data.chat.template == ""
  one, two = _tensors(tmp_path / "m1_hf"), _tensors(tmp_path / "m2_hf")
  for name in one:
    np.testing.assert_allclose(one[name], two[name], atol=1e-6, err_msg=name)
  # the merged HF directory loads in transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m1_hf")
  assert model.config.num_hidden_layers == 3


def test_bad_merges_are_refused_in_one_line(models, tmp_path):
  with pytest.raises(ValueError, match=r"merge_method='soup'; allowed: \['linear', 'slerp'"):
    parse_config("merge_method: soup\nmodels: [{model: x}]")
  with pytest.raises(ValueError, match="merge_method='ties' needs base_model"):
    parse_config("merge_method: ties\nmodels: [{model: x, parameters: {weight: 1}}]")
  with pytest.raises(ValueError, match="slerp interpolates base_model and one other model"):
    parse_config(f"merge_method: slerp\nbase_model: {models['base']}\nparameters: {{t: 0.5}}\n"
                 f"models: [{{model: {models['a']}}}, {{model: {models['b']}}}]")
  with pytest.raises(ValueError, match=r"parameters.density is not a per-model parameter of "
                                       r"task_arithmetic"):
    parse_config(f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
                 f"models: [{{model: {models['a']}, parameters: {{weight: 1, density: 0.5}}}}]")
  with pytest.raises(ValueError, match=r"needs a weight"):
    parse_config(f"merge_method: ties\nbase_model: {models['base']}\n"
                 f"models: [{{model: {models['a']}}}]")
  with pytest.raises(ValueError, match=r"\['slices'\] are not supported"):
    parse_config("merge_method: linear\nslices: []")
  other = tmp_path / "other"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(
          other)
  config = parse_config(f"merge_method: linear\nmodels: [{{model: {models['a']}, parameters: "
                        f"{{weight: 1}}}}, {{model: {other}, parameters: {{weight: 1}}}}]")
  with pytest.raises(ValueError, match=r"has model.d_ff=48, .* has 64: merging needs one "
                                       r"architecture"):
    merge(config, tmp_path / "never")
  assert not (tmp_path / "never").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="exists and is not empty"):
    merge(config, tmp_path / "full")
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
  assert json.loads((models["a"] / "config.json").read_text())["intermediate_size"] == 64
