"""Quantized training (train.quantization, qwix): which matmuls run int8 / fp8, forward and
backward; a short run against the float one; a TPU AOT compile with int8 dots; refusals."""

import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from llm import config as config_lib  # noqa: E402
from llm.model import make_model, quant  # noqa: E402
from llm.model.transformer import init_params, unbox  # noqa: E402
from llm.train import train  # noqa: E402


def _dots(config, kind):
  """[(lhs type, rhs type)] of every dot in the lowered forward + backward program."""
  model = quant.for_training(make_model(config.model), kind)
  params = unbox(init_params(model, jax.random.key(0)))
  tokens = jnp.ones((2, 16), jnp.int32)
  text = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum())).lower(
      params).as_text()
  return re.findall(r"stablehlo.dot_general[^\n]*: \(tensor<[\dx]*x(\w+)>, tensor<[\dx]*x(\w+)>",
                    text)


@pytest.mark.parametrize("kind,dtype,bwd_dtype", [("int8", "i8", "i8"),
                                                  ("fp8", "f8E4M3FN", "f8E5M2")])
def test_projection_matmuls_run_quantized_forward_and_backward(config, kind, dtype, bwd_dtype):
  """In the scanned layer's program: q, k, v, o, gate, up, down forward (7) and their two
  gradients each (14) in the quantized type (fp8's backward in e5m2); the attention
  scores and values, and the head, stay float."""
  dots = _dots(config, kind)
  quantized = [d for d in dots if d[0] != "f32"]
  assert len(quantized) == 21
  forward = [d for d in quantized if d == (dtype, dtype)]
  backward = [d for d in quantized if bwd_dtype in d and d != (dtype, dtype)]
  assert (len(forward), len(backward)) == ((21, 0) if dtype == bwd_dtype else (7, 14))
  assert len(dots) > len(quantized)  # attention and the head: float
  assert all(d == ("f32", "f32") for d in _dots(config, "none"))


def test_mla_and_capacity_experts_run_quantized_and_dispatch_stays_exact(config):
  """An MLA layer (q_a, q_b, kv_a, kv_b's expansion, o) with capacity-buffer experts
  (gate, up, down per expert; one shared expert: 3 more): 11 int8 matmuls forward, 22
  backward, whatever was traced before. The capacity dispatch and combine (one-hot and gate weights), the router,
  the attention and the head stay float, and the loss is within 2% of the float model's."""
  config.model.update(n_layers=1, head_dim=24, n_kv_heads=config.model.n_heads, mlp="moe")
  config.model.mla.update(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16)
  config.model.moe.update(n_experts=4, top_k=2, n_shared=1, compute="capacity")
  dots = _dots(config, "int8")
  assert dots.count(("i8", "i8")) == 33
  assert dots.count(("f32", "f32")) >= 6  # dispatch, combine, router, scores, values, head
  # traced after the int8 model, the float one has no int8 matmul (a jnp.dot traced under
  # qwix would have kept its quantized trace in jit's cache: the router once did)
  assert ("i8", "i8") not in _dots(config, "none")
  model, float_model = (quant.for_training(make_model(config.model), k) for k in ("int8", "none"))
  params = unbox(init_params(float_model, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.model.vocab_size)

  def loss(m):
    logits = m.apply({"params": params}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  np.testing.assert_allclose(loss(model), loss(float_model), rtol=0.02)
  assert loss(model) != loss(float_model)


def test_int8_training_follows_the_float_run(config, tmp_path):
  """30 steps: the int8 run's losses stay within 2% of the float run's."""
  config.train.update(steps=30, eval_every=30, checkpoint_every=30)
  train(config, tmp_path / "float", devices=jax.devices()[:1])
  config.train.quantization = "int8"
  train(config, tmp_path / "int8", devices=jax.devices()[:1])

  def losses(d):
    return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")
            if "loss" in json.loads(line)]

  f, q = np.asarray(losses(tmp_path / "float")), np.asarray(losses(tmp_path / "int8"))
  assert q[-1] < q[0] - 0.5  # it learns
  np.testing.assert_allclose(q, f, rtol=0.02)
  assert not np.array_equal(q, f)  # and it did run quantized


def test_quantized_training_refusals(config):
  config.train.quantization = "int4"
  with pytest.raises(ValueError, match="train.quantization='int4' is not allowed"):
    config_lib.validate(config)
  config.train.quantization = "int8"
  config.model.lora.rank = 4
  with pytest.raises(ValueError, match="use QLoRA's model.lora.base_quant"):
    config_lib.validate(config)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_int8_training_compiles_for_tpu_with_int8_dots_and_the_int8_peak(config):
  """A v5e-4 AOT compile of the int8 step multiplies s8 operands (the bf16 one does not),
  and its predicted compute uses the v5e's int8 peak (394 T) on the quantized share."""
  from llm import plan
  config.model.update(d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, dtype="bfloat16")
  config.mesh.update(data=1, fsdp=4)
  target = plan.tpu_target("v5e-4")
  plain = plan.compile_step(config, target)
  config.train.quantization = "int8"
  int8 = plan.compile_step(config, target)
  assert int8.int8_matmuls > 0 and plain.int8_matmuls == 0
  share = plan.quantized_share(config.model, config.data.seq_len)
  assert 0 < share < 1
  seconds = int8.flops_per_chip * (share / 394e12 + (1 - share) / 197e12)
  assert int8.prediction.compute_seconds == pytest.approx(seconds)
  assert int8.prediction.compute_seconds < plain.prediction.compute_seconds
