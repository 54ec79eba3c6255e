"""KV-cache decoding against full forwards, and samplers against their definitions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llm.inference import Decoder
from llm.inference.sampling import SamplingParams, filter_logits, sample
from llm.model import make_model
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model_and_params():
  cfg = tiny_config()
  model = make_model(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  # Larger weights than init so the random model's argmax is decisive, not a near tie.
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 2 else x, params)
  return cfg, model, params


def _mixed_moe_model():
  """Dense and MoE layers alternating (moe.every=2): the cache is scanned in groups."""
  cfg = tiny_config()
  cfg.model.update(mlp="moe", n_layers=4)
  cfg.model.moe.update(n_experts=4, top_k=2, d_ff=32, every=2)
  model = make_model(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  return cfg, model, jax.tree.map(lambda x: x * 3.0 if x.ndim > 2 else x, params)


@pytest.mark.parametrize("which,unroll", [("dense", True), ("dense", False),
                                          ("every_other_layer_moe", True),
                                          ("every_other_layer_moe", False)])
def test_greedy_cached_decoding_equals_argmax_of_full_forward(model_and_params, which, unroll):
  """Both decoding layouts: scanned layers with one stacked cache, and unrolled layers
  (params unstacked) with a cache buffer per layer (the default on CPU)."""
  cfg, model, params = model_and_params if which == "dense" else _mixed_moe_model()
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 512, n)) for n in (5, 11, 1)]  # different lengths: padded
  steps = 12
  decoder = Decoder(cfg.model, params, unroll=unroll)
  assert decoder.unrolled == unroll
  got = decoder.generate(prompts, steps, SamplingParams(temperature=0.0))
  # Greedy: every generated token is the argmax of the full forward over what precedes it.
  # One causal forward over prompt + continuation checks them all (right padding cannot
  # reach earlier positions).
  seqs = [list(p) + c for p, c in zip(prompts, got)]
  longest = max(len(x) for x in seqs)
  logits = jax.jit(model.apply)({"params": params},
                                jnp.asarray([x + [0] * (longest - len(x)) for x in seqs]))
  for i, (prompt, continuation) in enumerate(zip(prompts, got)):
    assert len(continuation) == steps
    chosen = np.argmax(logits[i, len(prompt) - 1:len(prompt) - 1 + steps], axis=-1)
    assert continuation == chosen.tolist()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_out_major_kernels_compute_the_same_model(model_and_params, scan_layers):
  """model.out_major_kernels (the CPU decoding layout): every projection kernel moved to
  [out..., in...] by to_out_major gives the same logits, stacked layers or not; the
  decoder uses it when unrolled, and a LoRA config refuses it."""
  from llm.config import base_config, validate
  from llm.model.transformer import to_out_major, unstack_layers
  cfg, model, params = model_and_params
  if not scan_layers:
    params = unstack_layers(params, cfg.model)
  src = cfg.model.copy_and_resolve_references()
  src.scan_layers = scan_layers
  dst = src.copy_and_resolve_references()
  dst.out_major_kernels = True
  moved = to_out_major(params, src)
  layer = "layers" if scan_layers else "layers_0"
  q_in, q_out = (p[layer]["attn"]["q"]["kernel"] for p in (params, moved))  # [(L,) D, H, E]
  np.testing.assert_array_equal(np.moveaxis(np.asarray(q_in), -3, -1), q_out)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 512, (2, 9)))
  want = make_model(src).apply({"params": params}, tokens)
  got = make_model(dst).apply({"params": moved}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert Decoder(cfg.model, None, unroll=True).out_major
  assert not Decoder(cfg.model, None, unroll=False).out_major
  lora = cfg.model.copy_and_resolve_references()
  lora.lora.rank = 4
  assert not Decoder(lora, None, unroll=True).out_major  # adapters keep [in, out] kernels
  bad = base_config()
  bad.model.update(out_major_kernels=True)
  bad.model.lora.rank = 4
  with pytest.raises(ValueError, match="out_major_kernels with model.lora.rank"):
    validate(bad)


def test_sliding_window_decoding_equals_windowed_full_forward(model_and_params):
  """With model.sliding_window, the KV-cache path masks the same keys as the forward."""
  _, full_model, params = model_and_params
  cfg = tiny_config()
  cfg.model.sliding_window = 4
  forward = jax.jit(make_model(cfg.model).apply)
  tokens = jnp.asarray([list(np.random.default_rng(1).integers(3, 512, 12))])
  full = full_model.apply({"params": params}, tokens)
  windowed = forward({"params": params}, tokens)
  np.testing.assert_allclose(windowed[:, :4], full[:, :4], atol=1e-5)  # window not reached
  assert float(jnp.abs(windowed[:, 4:] - full[:, 4:]).max()) > 1e-3  # beyond it, it matters
  prompts = [list(np.asarray(tokens[0, :n])) for n in (3, 9)]
  got = Decoder(cfg.model, params).generate(prompts, 6, SamplingParams(temperature=0.0))
  for prompt, continuation in zip(prompts, got):
    seq = list(prompt)
    for _ in range(6):
      seq.append(int(jnp.argmax(forward({"params": params}, jnp.asarray([seq]))[0, -1])))
    assert continuation == seq[len(prompt):]


@pytest.mark.parametrize("unroll", [True, False])
def test_a_remat_model_decodes_without_remat_and_the_same(model_and_params, unroll):
  """Under remat the prefill's static slot 0 would become a tracer: the empty cache would
  be attended over, its all-false mask constant-folded by XLA for seconds per layer."""
  cfg, _, params = model_and_params
  remat_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
  remat_cfg.remat = "full"
  decoder = Decoder(remat_cfg, params, unroll=unroll)
  assert decoder.cfg.remat == "none"
  prompts = [[5, 7, 11], [3, 2, 9, 4, 13, 8]]
  greedy = SamplingParams(temperature=0.0)
  assert decoder.generate(prompts, 6, greedy) == Decoder(cfg.model, params, unroll=unroll).generate(
      prompts, 6, greedy)


def test_eos_stops_a_row(model_and_params):
  cfg, _, params = model_and_params
  decoder = Decoder(cfg.model, params)
  free = decoder.generate([[5, 6, 7]], 6, SamplingParams(temperature=0.0))[0]
  stopped = decoder.generate([[5, 6, 7]], 6, SamplingParams(temperature=0.0), eos_id=free[2])[0]
  assert stopped == free[:free.index(free[2])]


def test_chunked_decoding_equals_one_token_at_a_time(model_and_params):
  """Tokens come `chunk` per jitted loop; what is generated, streamed and where a row
  stops are the same as one step per call, whatever the chunk."""
  cfg, _, params = model_and_params
  p = SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.3)
  prompts = [[5, 6, 7], [9, 3], [4, 4, 4, 4]]

  def run(chunk, eos=None):
    calls = []
    out = Decoder(cfg.model, params, chunk=chunk).generate(
        prompts, 11, p, seed=3, eos_id=eos,
        on_token=lambda step, tokens, done: calls.append((step, tokens.tolist(), done.tolist())))
    return out, calls

  one, one_calls = run(1)
  assert [len(r) for r in one] == [11, 11, 11] and len(one_calls) == 11
  for chunk in (4, 8, 16):
    assert run(chunk) == (one, one_calls)
  eos = one[1][4]  # stops row 1 (at least) in the middle of a chunk
  stopped, calls = run(4, eos)
  assert stopped == run(1, eos)[0] and stopped[1] == one[1][:one[1].index(eos)]
  with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
    Decoder(cfg.model, params, chunk=0)


def test_sampling_is_seeded(model_and_params):
  cfg, _, params = model_and_params
  decoder = Decoder(cfg.model, params)
  p = SamplingParams(temperature=1.0, top_p=0.9)
  a = decoder.generate([[5, 6, 7]], 8, p, seed=1)
  assert a == decoder.generate([[5, 6, 7]], 8, p, seed=1)
  assert a != decoder.generate([[5, 6, 7]], 8, p, seed=2)


LOGITS = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))


def _probs(p, seen=None):
  return np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(LOGITS), p, seen), axis=-1))[0]


def test_filters_give_the_defined_distributions():
  base = np.exp(LOGITS[0])
  np.testing.assert_allclose(_probs(SamplingParams(temperature=1.0)), base, rtol=1e-6)
  t = base ** 2 / (base ** 2).sum()
  np.testing.assert_allclose(_probs(SamplingParams(temperature=0.5)), t, rtol=1e-5)
  k = np.where(np.arange(6) < 3, base, 0) / base[:3].sum()
  np.testing.assert_allclose(_probs(SamplingParams(temperature=1.0, top_k=3)), k, rtol=1e-6)
  # top_p=0.7: 0.4 + 0.25 = 0.65 < 0.7, so the nucleus is the first three tokens.
  np.testing.assert_allclose(_probs(SamplingParams(temperature=1.0, top_p=0.7)), k, rtol=1e-6)
  two = np.where(np.arange(6) < 2, base, 0) / base[:2].sum()
  np.testing.assert_allclose(_probs(SamplingParams(temperature=1.0, top_p=0.65)), two, rtol=1e-5)
  # min_p=0.3: keep tokens with p >= 0.3 * 0.4 = 0.12.
  np.testing.assert_allclose(_probs(SamplingParams(temperature=1.0, min_p=0.3)), k, rtol=1e-6)
  seen = jnp.asarray([[True, False, False, False, False, False]])
  logits = LOGITS[0].copy()
  logits[0] = logits[0] * 2.0  # negative logit: multiplied by the penalty
  r = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(_probs(SamplingParams(temperature=1.0, repetition_penalty=2.0), seen),
                             r, rtol=1e-5)


def test_samples_follow_the_filtered_distribution():
  p = SamplingParams(temperature=1.0, top_k=4)
  logits = jnp.tile(jnp.asarray(LOGITS), (20000, 1))
  draws = np.asarray(sample(jax.random.key(0), logits, p))
  freq = np.bincount(draws, minlength=6) / len(draws)
  expected = _probs(p)
  assert freq[4] == 0 and freq[5] == 0
  np.testing.assert_allclose(freq, expected, atol=0.015)
  assert (np.asarray(sample(jax.random.key(0), logits[:3], SamplingParams(temperature=0.0))) == 0).all()


def test_bad_sampling_values_are_named():
  with pytest.raises(ValueError, match="top_p=1.5 must be in"):
    SamplingParams(top_p=1.5)
  with pytest.raises(ValueError, match="temperature=-1"):
    SamplingParams(temperature=-1)


@pytest.mark.parametrize("attention,mesh_axes", [("xla", dict(data=2, tensor=2)),
                                                  ("flash", dict(data=2, tensor=2))])
def test_decoding_on_a_mesh_matches_one_device(model_and_params, attention, mesh_axes):
  """Decoding attends through the training dispatch, so under a mesh (batch over data,
  heads over tensor; the kernel inside shard_map for flash) it gives the same tokens."""
  from llm.parallel.mesh import make_mesh, use_mesh
  cfg, _, params = model_and_params
  prompts = [list(np.random.default_rng(2).integers(3, 512, n)) for n in (4, 9)]
  greedy = SamplingParams(temperature=0.0)
  alone = Decoder(cfg.model, params).generate(prompts, 6, greedy)
  model_cfg = tiny_config().model
  model_cfg.attention = attention
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh_axes},
                   jax.devices()[:4])
  with use_mesh(mesh):
    sharded = Decoder(model_cfg, params).generate(prompts, 6, greedy)
  assert sharded == alone
