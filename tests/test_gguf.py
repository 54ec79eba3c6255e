"""GGUF export (python -m llm.convert llm-to-gguf): read back with the gguf package
against the Hugging Face export (itself checked against transformers), and, where
llama-cpp-python is installed (built from pip; not in the test extra), greedy tokens of
llama.cpp against ours."""

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llm.convert import hf  # noqa: E402
from llm.convert.gguf_export import _unrotate, check_exportable, gguf_name, llm_to_gguf  # noqa: E402
from llm.train import train  # noqa: E402
from llm.workdir import load_params  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
  from tests.helpers import tiny_config
  c = tiny_config()
  c.data.tokenizer_path = tokenizer_path
  c.train.update(steps=20, checkpoint_every=20, eval_every=20)
  c.optim.update(lr=1e-2, warmup_steps=0)
  root = tmp_path_factory.mktemp("gguf")
  train(c, str(root / "w"), devices=jax.devices()[:1])
  for kind in ("f32", "f16", "q8_0"):
    llm_to_gguf(str(root / "w"), str(root / f"{kind}.gguf"), kind)
  return root


def _our_logits(config, params, ids: list[int]) -> np.ndarray:
  """Our model's logits [T, V] at every position of one sequence."""
  import jax.numpy as jnp
  from llm.model import forward, make_model
  t, n = jnp.asarray([ids]), len(ids)
  batch = {"inputs": t, "targets": t, "segment_ids": jnp.ones((1, n), jnp.int32),
           "positions": jnp.arange(n)[None]}
  return np.asarray(forward(make_model(config.model), params, batch)[0][0], np.float32)


def _reinterleave_inverse(w, n_heads):
  """The inverse of llama.cpp's q/k permutation, written independently."""
  d = w.shape[0] // n_heads
  return w.reshape(n_heads, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def test_tensors_metadata_and_tokenizer_read_back(trained, tokenizer_path):
  import sentencepiece as spm
  config, params = load_params(trained / "w")
  c = config.model
  expected = dict(hf.params_to_hf(jax.device_get(params), c))
  for kind, tol in (("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)):
    reader = gguf.GGUFReader(str(trained / f"{kind}.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(n) for n in expected}
    for name, w in expected.items():
      t = tensors[gguf_name(name)]
      got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float32)
      if name.endswith("q_proj.weight"):
        got = _reinterleave_inverse(got, c.n_heads)
      elif name.endswith("k_proj.weight"):
        got = _reinterleave_inverse(got, c.n_kv_heads)
      scale = np.abs(w).max()
      np.testing.assert_allclose(got, w, atol=tol * scale + 1e-7, err_msg=f"{kind} {name}")
      if w.ndim == 1:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
  reader = gguf.GGUFReader(str(trained / "f32.gguf"))
  field = lambda k: reader.fields[k].contents()  # noqa: E731
  assert field("general.architecture") == "llama"
  assert field("llama.block_count") == c.n_layers
  assert field("llama.attention.head_count_kv") == c.n_kv_heads
  assert field("llama.rope.freq_base") == pytest.approx(c.rope_theta)
  sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
  tokens = field("tokenizer.ggml.tokens")
  assert tokens[:sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  assert field("tokenizer.ggml.bos_token_id") == sp.bos_id()
  assert field("tokenizer.ggml.eos_token_id") == sp.eos_id()


def test_unrotate_matches_an_independent_inverse_and_refusals(config):
  w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
  np.testing.assert_array_equal(_reinterleave_inverse(_unrotate(w, 4), 4), w)
  config.model.update(mlp="moe")
  with pytest.raises(ValueError, match="dense Llama-family models; this one has model.mlp='moe'"):
    check_exportable(config.model)
  with pytest.raises(ValueError, match="--type='q4'"):
    llm_to_gguf("x", "y.gguf", "q4")


@pytest.mark.slow
def test_llama_cpp_logits_and_greedy_tokens_equal_ours(trained):
  """llama.cpp (llama-cpp-python, built from pip) on the exported files: its logits at
  every prompt position against ours (f32, with an f32 KV cache, to 1e-5 of their spread;
  f16 and q8_0 files with llama.cpp's default f16 cache, looser),
  and its greedy tokens equal ours."""
  llama_cpp = pytest.importorskip("llama_cpp")
  from llm.inference.decoder import Decoder
  from llm.inference.sampling import SamplingParams
  config, params = load_params(trained / "w")
  prompt = [1, 40, 141, 242, 43, 344, 45, 300, 12, 99]
  n = len(prompt)
  ours = _our_logits(config, params, prompt)
  greedy = Decoder(config.model, params).generate([prompt], 8, SamplingParams(temperature=0.0))[0]
  spread = ours.std()
  assert spread > 0.5  # logits that tell tokens apart
  for kind, tol in (("f32", 1e-5), ("f16", 1e-2), ("q8_0", 5e-2)):
    kv = dict(type_k=0, type_v=0) if kind == "f32" else {}  # an f32 KV cache (default f16)
    llm = llama_cpp.Llama(model_path=str(trained / f"{kind}.gguf"), n_ctx=64, verbose=False,
                          n_threads=2, logits_all=True, **kv)
    if kind == "f32":  # the SentencePiece vocabulary tokenizes as ours
      from llm.workdir import load_tokenizer
      tok = load_tokenizer(trained / "w", config)
      for text in ("def f(x):\n    return  x + 1", "Hello, world! 123"):
        assert llm.tokenize(text.encode(), add_bos=True) == tok.bos_prefix() + list(tok.encode(text))
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[:n], np.float32)
    err = np.abs(theirs - ours).max() / spread
    assert err < tol, (kind, err)
    if kind != "q8_0":
      out = []
      for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == len(greedy):
          break
      assert out == greedy, (kind, out, greedy)


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
  """A model converted from a Hugging Face directory with a byte-level BPE tokenizer.json,
  exported to GGUF."""
  from llm.convert.__main__ import hf_to_llm
  from tests.test_serve_http import make_hf_dir
  root = tmp_path_factory.mktemp("gguf_bpe")
  hf_to_llm(str(make_hf_dir(root)), str(root / "w"))
  llm_to_gguf(str(root / "w"), str(root / "m.gguf"), "f32")
  return root


def test_bpe_tokenizer_travels_as_gpt2_vocabulary(bpe_export):
  import json
  spec = json.loads((bpe_export / "w" / "tokenizer.json").read_text())
  reader = gguf.GGUFReader(str(bpe_export / "m.gguf"))
  field = lambda k: reader.fields[k].contents()  # noqa: E731
  assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
  tokens = field("tokenizer.ggml.tokens")
  vocab = {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
  assert all(tokens[i] == t for t, i in vocab.items())
  assert len(field("tokenizer.ggml.merges")) == len(spec["model"]["merges"])
  with pytest.raises(ValueError, match="exists; llm-to-gguf writes a new file"):
    llm_to_gguf(str(bpe_export / "w"), str(bpe_export / "m.gguf"))


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_scores_the_bpe_export_as_we_do(bpe_export):
  llama_cpp = pytest.importorskip("llama_cpp")
  from llm.workdir import load_tokenizer
  config, params = load_params(bpe_export / "w")
  tok = load_tokenizer(bpe_export / "w", config)
  text = "def foo(x):\n    return x + 1  # hello, world\n"
  ours = tok.bos_prefix() + list(tok.encode(text))
  llm = llama_cpp.Llama(model_path=str(bpe_export / "m.gguf"), n_ctx=64, verbose=False,
                        n_threads=2, logits_all=True, type_k=0, type_v=0)  # f32 KV cache
  assert llm.tokenize(text.encode(), add_bos=True, special=False) == ours
  n = len(ours)
  logits = _our_logits(config, params, ours)
  llm.eval(ours)
  err = np.abs(np.asarray(llm.scores[:n], np.float32) - logits).max() / logits.std()
  assert err < 1e-5, err
