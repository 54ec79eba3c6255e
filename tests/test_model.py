"""The Flax model against an independent NumPy implementation of the Llama forward."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import make_model
from tests.helpers import tiny_config


def np_rope_inv_freq(e, theta, scaling):
  inv = 1.0 / theta ** (np.arange(0, e, 2, dtype=np.float64) / e)
  if scaling["type"] == "none":
    return inv
  f, lo, hi, old = (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                    scaling["original_max_position"])
  out = []
  for w in inv:
    wavelen = 2 * math.pi / w
    if wavelen < old / hi:
      out.append(w)
    elif wavelen > old / lo:
      out.append(w / f)
    else:
      s = (old / wavelen - lo) / (hi - lo)
      out.append((1 - s) * w / f + s * w)
  return np.array(out)


def np_forward(params, cfg, tokens, segment_ids, positions):
  """Plain NumPy float64 Llama: loops over layers and heads, masks causal+segment."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  m = cfg.model
  e = m.d_model // m.n_heads
  g = m.n_heads // m.n_kv_heads
  inv = np_rope_inv_freq(e, m.rope_theta, m.rope_scaling.to_dict())

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + m.norm_eps) * w

  def rope(x):  # x [B, T, N, E]
    ang = positions[..., None] * inv  # B T E/2
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :e // 2], x[..., e // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

  b, t = tokens.shape
  x = p["embedding"][tokens]
  mask = (np.arange(t)[:, None] >= np.arange(t)[None]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
  for layer in range(m.n_layers):
    lp = jax.tree.map(lambda a: a[layer], p["layers"])
    h = rms(x, lp["attn_norm"]["scale"])
    q = np.einsum("btd,dhe->bthe", h, lp["attn"]["q"]["kernel"])
    k = np.einsum("btd,dke->btke", h, lp["attn"]["k"]["kernel"])
    v = np.einsum("btd,dke->btke", h, lp["attn"]["v"]["kernel"])
    if m.qk_norm:
      q, k = rms(q, lp["attn"]["q_norm"]["scale"]), rms(k, lp["attn"]["k_norm"]["scale"])
    q, k = rope(q), rope(k)
    out = np.zeros_like(q)
    for head in range(m.n_heads):
      s = np.einsum("bte,bse->bts", q[:, :, head], k[:, :, head // g]) / math.sqrt(e)
      s = np.where(mask, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[:, :, head] = np.einsum("bts,bse->bte", w, v[:, :, head // g])
    x = x + np.einsum("bthe,hed->btd", out, lp["attn"]["o"]["kernel"])
    h = rms(x, lp["mlp_norm"]["scale"])
    gate = h @ lp["mlp"]["gate"]["kernel"]
    up = h @ lp["mlp"]["up"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["mlp"]["down"]["kernel"]
  x = rms(x, p["final_norm"]["scale"])
  unembed = p["embedding"].T if m.tie_embeddings else p["unembed"]
  return x @ unembed


def _packed_inputs(b=2, t=16, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t))
  segment_ids = np.ones((b, t), np.int32)
  segment_ids[0, 5:11] = 2
  segment_ids[0, 11:] = 3
  starts = np.array([[0] * 5 + [5] * 6 + [11] * 5, [0] * 16])
  positions = np.arange(t)[None] - starts
  return tokens, segment_ids, positions


def _init(cfg, t=16):
  model = make_model(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, t), jnp.int32))["params"])
  # Nonzero norm scales so a wrong norm placement cannot hide.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1 + 0.1 * jnp.arange(x.shape[-1]) / x.shape[-1])
      if "scale" in jax.tree_util.keystr(path) else x, params)
  return model, params


@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie_embeddings=True),
    dict(n_kv_heads=1),  # MQA
    dict(n_kv_heads=4),  # MHA
    dict(qk_norm=True),
    dict(rope_theta=500000.0, rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position=16)),
])
def test_forward_matches_numpy(variant):
  cfg = tiny_config()
  cfg.model.update(variant)
  model, params = _init(cfg)
  tokens, seg, pos = _packed_inputs()
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))
  ref = np_forward(params, cfg, tokens, seg, pos)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=2e-4)


def test_packed_documents_do_not_see_each_other():
  """Each packed document's logits equal those of the document run on its own."""
  cfg = tiny_config()
  model, params = _init(cfg)
  tokens, seg, pos = _packed_inputs()
  packed = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))
  alone = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens[:1, 5:11]))
  np.testing.assert_allclose(np.asarray(packed[0, 5:11]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_and_unscanned_layers_give_same_loss_and_grads(remat):
  base = tiny_config()
  tokens, seg, pos = (jnp.asarray(a) for a in _packed_inputs())
  model, params = _init(base)

  def loss(model, params):
    return jnp.mean(jax.nn.log_softmax(model.apply({"params": params}, tokens, seg, pos))[..., 0])

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  cfg = tiny_config()
  cfg.model.remat = remat
  got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(make_model(cfg.model), p)))(params)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, ref_grads)

  cfg.model.scan_layers = False
  unscanned = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.model.n_layers):
    unscanned[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
  np.testing.assert_allclose(jax.jit(lambda p: loss(make_model(cfg.model), p))(unscanned), ref_loss,
                             rtol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  cfg = tiny_config()
  model, params = _init(cfg)
  tokens, seg, pos = (jnp.asarray(a) for a in _packed_inputs())
  ref = jax.jit(model.apply)({"params": params}, tokens, seg, pos)
  cfg.model.dtype = "bfloat16"
  got = jax.jit(make_model(cfg.model).apply)({"params": params}, tokens, seg, pos)
  assert got.dtype == jnp.float32  # logits are always float32 for the loss
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-2


def test_params_are_annotated_with_logical_axes():
  cfg = tiny_config()
  boxed = make_model(cfg.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert boxed["layers"]["attn"]["q"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  assert boxed["layers"]["mlp"]["down"]["kernel"].names == ("layers", "mlp", "embed")
  assert boxed["embedding"].names == ("vocab", "embed")
