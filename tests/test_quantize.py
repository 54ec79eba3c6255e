"""Weight-only quantized inference and the int8 KV cache: int4 storage against qwix's own
quantize/dequantize and NumPy; `python -m llm.quantize` writes a workdir whose logits
are exactly the dequantized float model's, served by the engine and the Decoder alike;
int8 KV pages / cache against the float cache; refusals in one line."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from llm.model import make_model, quant
from llm.serve.engine import Engine
from llm.serve.request import SamplingOptions

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
qwix = pytest.importorskip("qwix")


def _numpy_int4(w, axis, group):
  """Symmetric int4 as qwix defines it: scale = max |w| / 7.5 per group, values [-8, 7];
  and where w / scale is within float rounding of the tie at +-7.5 (either rounding)."""
  moved = np.moveaxis(w, axis, -1)
  g = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // group, group))
  scale = np.abs(g).max(axis=-1, keepdims=True) / 7.5
  q = np.clip(np.round(g / scale), -8, 7)
  tie = np.abs(np.abs(g / scale) - 7.5) < 1e-4
  back = lambda x: np.moveaxis(x.reshape(moved.shape), -1, axis)  # noqa: E731
  return back(q * scale), back(np.broadcast_to(tie, g.shape))


@pytest.mark.parametrize("shape,n_in,n_lead,group", [((256, 6, 8), 1, 0, 128),
                                                      ((4, 64, 32), 2, 0, 64),
                                                      ((2, 384, 16), 1, 1, 128)])
def test_int4_storage_matches_qwix_and_numpy(shape, n_in, n_lead, group):
  w = np.asarray(jax.random.normal(jax.random.key(0), shape) * 0.05, np.float32)
  q, scale = quant.quantize(w, "int4", n_in, n_lead)
  axis = n_lead + n_in - 1
  unstacked = shape[n_lead:]
  q_shape, s_shape, dtype = quant.quantized_shapes("int4", unstacked, n_in)
  assert q.dtype == jnp.uint8 and q.shape == shape[:n_lead] + q_shape
  assert scale.shape == shape[:n_lead] + s_shape and s_shape[n_in - 1] == shape[axis] // group
  back = np.asarray(quant.dequantize(q, scale, "int4", n_in, jnp.float32, n_lead))
  expected, tie = _numpy_int4(w, axis, group)
  np.testing.assert_allclose(back[~tie], expected[~tie], rtol=1e-6, atol=1e-7)
  scale_at_tie = np.abs(expected[tie]) / 7  # (at least the scale: those values are 7 or 8 x)
  assert np.all(np.abs(back[tie] - expected[tie]) <= scale_at_tie * 1.0001)
  reference = qwix.quantize(jnp.asarray(w), jnp.int4, tiled_axes={axis: group},
                            channelwise_axes=[i for i in range(w.ndim) if i != axis])
  np.testing.assert_allclose(back, qwix.dequantize(reference), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def float_workdir(tmp_path_factory):
  """A random fp32 HF Llama (d_model 128: int4 groups of 128) imported with hf-to-llm."""
  from llm.convert.__main__ import hf_to_llm
  root = tmp_path_factory.mktemp("quant")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # sharper logits than at init: greedy ties cannot hide a bug
    for p in model.parameters():
      p.mul_(4.0 if p.ndim == 2 else 1.0)
  model.save_pretrained(root / "hf")
  hf_to_llm(str(root / "hf"), str(root / "float"))
  return root


def _logits(model_cfg, params, tokens):
  return np.asarray(make_model(model_cfg).apply({"params": params}, jnp.asarray([tokens]))[0])


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_quantized_workdir_is_its_dequantized_model_everywhere(float_workdir, weights):
  """llm.quantize's workdir: its logits are the float model's with every projection kernel
  dequantized (and near the float model's); the engine and the Decoder serving it give
  the greedy tokens of that dequantized model's full forward passes."""
  from llm.inference.decoder import Decoder
  from llm.inference.sampling import SamplingParams
  from llm.quantize import quantize_workdir
  from llm.workdir import load_params
  out = quantize_workdir(str(float_workdir / "float"), str(float_workdir / weights), weights)
  config, params = load_params(out)
  float_config, float_params = load_params(float_workdir / "float")
  assert config.model.weight_quant == weights
  assert params["layers"]["attn"]["q"]["kernel_q"].dtype == (jnp.int8 if weights == "int8"
                                                             else jnp.uint8)
  nbytes = lambda p: sum(x.nbytes for x in jax.tree.leaves(p))  # noqa: E731
  assert nbytes(params) < nbytes(float_params) * (0.35 if weights == "int8" else 0.25)
  dequantized = quant.dequantize_base(params, weights)
  tokens = list(range(3, 40))
  ours = _logits(config.model, params, tokens)
  np.testing.assert_allclose(ours, _logits(float_config.model, dequantized, tokens), atol=2e-5)
  # (random weights have no structure to spare: int4 moves them ~10x more than int8)
  err = np.abs(ours - _logits(float_config.model, float_params, tokens)).mean() / ours.std()
  assert err < (0.05 if weights == "int8" else 0.5)

  prompt = [5, 17, 3, 9, 42, 7, 11]
  seq = list(prompt)
  apply = jax.jit(make_model(float_config.model).apply)
  for _ in range(10):  # right-padded to one length (causal: padding cannot reach back)
    logits = apply({"params": dequantized}, jnp.asarray([seq + [0] * (32 - len(seq))]))
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
  expected = seq[len(prompt):]
  decoded = Decoder(config.model, params).generate([prompt], 10, SamplingParams(temperature=0))
  assert list(decoded[0]) == expected
  engine = Engine(config.model, params, page_size=4, num_pages=24, max_num_batched_tokens=16,
                  max_num_seqs=2, max_model_len=64, buckets=(16,), warm_up=False)
  (served,) = engine.generate([prompt], [SamplingOptions(max_tokens=10, temperature=0.0,
                                                         ignore_eos=True)])
  assert served.outputs[0].token_ids == expected


def test_int8_kv_cache_in_the_engine_and_the_decoder(float_workdir):
  """int8 KV pages (engine) and an int8 decode cache (Decoder) quantize each token's key
  and value per head alike: their greedy tokens agree, their log-probabilities stay near
  the float cache's, and a page takes under a third of an fp32 one."""
  import ml_collections

  from llm.inference.decoder import Decoder
  from llm.inference.sampling import SamplingParams
  from llm.serve.runner import ModelRunner
  from llm.workdir import load_params
  config, params = load_params(float_workdir / "float")
  prompt = [5, 17, 3, 9, 42, 7, 11, 30, 2, 64, 8, 13, 21]
  options = SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
  kw = dict(page_size=4, num_pages=24, max_num_batched_tokens=16, max_num_seqs=2,
            max_model_len=64, buckets=(16,), warm_up=False)
  outs = {}
  for dtype in ("auto", "int8"):
    (out,) = Engine(config.model, params, kv_cache_dtype=dtype, **kw).generate([prompt],
                                                                             [options])
    outs[dtype] = out.outputs[0]
  int8_cfg = ml_collections.ConfigDict(config.model.to_dict())
  int8_cfg.kv_quant = "int8"
  decoded = Decoder(int8_cfg, params).generate([prompt], 12, SamplingParams(temperature=0))
  assert outs["int8"].token_ids == list(decoded[0])
  float_lp = [x["logprob"] for x in outs["auto"].logprobs]
  int8_lp = [x["logprob"] for x in outs["int8"].logprobs]
  n = next((i for i, (a, b) in enumerate(zip(outs["auto"].token_ids, outs["int8"].token_ids))
            if a != b), len(float_lp))
  assert n >= 4  # the same tokens for a while, and the same scores for those
  np.testing.assert_allclose(int8_lp[:n], float_lp[:n], atol=0.05)
  assert ModelRunner.kv_bytes_per_page(int8_cfg, 16) < ModelRunner.kv_bytes_per_page(
      config.model, 16) / 3


def test_quantization_refusals(float_workdir, tmp_path):
  from llm import config as config_lib
  from llm.quantize import quantize_workdir
  from llm.training.loop import train
  from tests.helpers import tiny_config
  with pytest.raises(ValueError, match="--weights='int3'; allowed: int8, int4"):
    quantize_workdir(str(float_workdir / "float"), str(tmp_path / "x"), "int3")
  (tmp_path / "taken").mkdir()
  with pytest.raises(ValueError, match="exists; llm.quantize writes a new directory"):
    quantize_workdir(str(float_workdir / "float"), str(tmp_path / "taken"), "int8")
  quantize_workdir(str(float_workdir / "float"), str(tmp_path / "q"), "int8")
  with pytest.raises(ValueError, match="already quantized"):
    quantize_workdir(str(tmp_path / "q"), str(tmp_path / "qq"), "int4")
  from llm.convert.__main__ import llm_to_hf
  with pytest.raises(ValueError, match="holds int8 kernels .* export its float original"):
    llm_to_hf(str(tmp_path / "q"), str(tmp_path / "hf"))
  cfg = tiny_config()
  cfg.model.weight_quant = "int8"
  with pytest.raises(ValueError, match="do not train"):
    train(cfg, str(tmp_path / "run"))
  cfg.model.lora.rank = 4
  with pytest.raises(ValueError, match="model.weight_quant='int8' with model.lora.rank > 0"):
    config_lib.validate(cfg)
  from llm.workdir import load_params
  config, params = load_params(float_workdir / "float")
  with pytest.raises(ValueError, match="kv_cache_dtype='fp8'; allowed: auto, int8"):
    Engine(config.model, params, kv_cache_dtype="fp8", num_pages=8, max_model_len=16,
           warm_up=False)
