"""Pipeline parallelism (mesh.pipeline, llm/parallel/pipeline.py) on 8 CPU devices against
a 1-device run: GPipe and the circular schedule composed with FSDP, tensor, data and
sequence parallelism, with LoRA, grad accumulation, MTP and off-policy distillation; MoE
stages with expert parallelism against grad accumulation; checkpoints moving between
pipeline layouts; refusals; the bubble formula; the planner's TPU compiles."""

import json

import jax
import numpy as np
import pytest

from llm.parallel import pipeline
from llm.train import train
from tests.helpers import losses


def _config(config, **model):
  config.model.update(n_layers=8, **model)
  config.train.update(steps=4, checkpoint_every=2, eval_every=4)
  return config


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, tokenizer_path):
  """Losses of the uninterrupted 1-device run the pipelined ones must repeat."""
  from tests.helpers import tiny_config
  config = tiny_config()
  config.data.tokenizer_path = tokenizer_path
  out = tmp_path_factory.mktemp("one")
  train(_config(config), out, devices=jax.devices()[:1])
  return losses(out)


@pytest.mark.parametrize("mesh,repeats,micro,remat", [
    (dict(pipeline=4, fsdp=2), 1, 0, "none"),  # GPipe, 4 microbatches (one per stage)
    (dict(pipeline=4, fsdp=2), 2, 4, "none"),  # circular: stage s runs layers s and 4 + s
    (dict(pipeline=2, tensor=2, data=2), 2, 2, "full"),  # and each layer rematerialised
], ids=["p4xfsdp2-gpipe", "p4xfsdp2-circular", "p2xtensor2xdata2-circular-remat"])
def test_pipelined_training_matches_one_device(config, tmp_path, one_device, mesh, repeats,
                                               micro, remat, capsys):
  config = _config(config, pipeline_repeats=repeats, remat=remat)
  config.mesh.update(**{"data": 1, **mesh})
  config.train.pipeline_microbatches = micro
  train(config, tmp_path)
  got = losses(tmp_path)
  np.testing.assert_allclose([got[s] for s in sorted(one_device)],
                             [one_device[s] for s in sorted(one_device)], rtol=2e-5)
  n, m = mesh["pipeline"], micro or mesh["pipeline"]
  assert f"bubble {pipeline.bubble_fraction(n, repeats, m):.1%}" in capsys.readouterr().out


def test_ring_attention_and_multi_token_prediction_around_the_stages(config, tmp_path):
  """pipeline=2 x sequence=2 x data=2: ring attention (its own shard_map over "sequence")
  inside each stage, and DeepSeek's MTP heads after the stages, on the whole batch like
  the head: the losses (MTP's included) of the 1-device run."""
  config.model.update(n_layers=4, mtp_layers=1)
  config.train.update(steps=3, checkpoint_every=3, eval_every=3)
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.mesh.update(pipeline=2, sequence=2, data=2)
  train(config, tmp_path / "pp")
  one, pp = (_records(tmp_path / run) for run in ("one", "pp"))
  for name in ("loss", "mtp_loss", "objective"):
    np.testing.assert_allclose([pp[s][name] for s in (1, 2, 3)],
                               [one[s][name] for s in (1, 2, 3)], rtol=2e-5, err_msg=name)


def test_distillation_runs_the_teacher_pipelined_and_samples_unpipelined(config, tmp_path,
                                                                        tokenizer_path):
  """train.objective=distill on pipeline=2 x data=2, half the steps on-policy: the teacher
  (4 layers, its own config) is pipelined in the same step, the student's completions are
  sampled by the engine with the layers unstacked (no pipeline in decoding); the losses
  are the 1-device run's. A teacher whose layers do not split over the stages is refused
  before any compile."""
  from llm.model import init_params, make_model, unbox
  from llm.workdir import Workdir, save_params
  from tests.test_distill import _chat_data, _teacher_cfg
  config.model.n_layers = 4
  teacher_cfg = _teacher_cfg(config)
  teacher_cfg.model.n_layers = 4
  teacher_cfg.data.tokenizer_path = tokenizer_path
  teacher = Workdir(tmp_path / "teacher")
  save_params(teacher.params, unbox(init_params(make_model(teacher_cfg.model),
                                                jax.random.key(7), 8)))
  teacher.write_config(teacher_cfg)
  _chat_data(tmp_path / "chat.jsonl")
  config.train.update(objective="distill", steps=3, eval_every=3, checkpoint_every=3,
                      batch_size=4)
  config.train.distill.update(teacher=str(tmp_path / "teacher"), lmbda=0.5, max_new_tokens=8)  # step 2 on-policy
  config.data.update(source="jsonl", paths=str(tmp_path / "chat.jsonl"), seq_len=64)
  config.data.chat.template = "mistral"
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.mesh.update(pipeline=2, data=2)
  train(config, tmp_path / "pp", devices=jax.devices()[:4])
  one, pp = losses(tmp_path / "one"), losses(tmp_path / "pp")
  np.testing.assert_allclose([pp[s] for s in one], [one[s] for s in one], rtol=2e-5)
  teacher_cfg.model.n_layers = 3
  teacher.write_config(teacher_cfg)
  with pytest.raises(ValueError, match=r"cannot run on mesh.pipeline=2: its "
                                       r"model.n_layers=3 .* does not split into 2 chunks"):
    train(config, tmp_path / "pp3", devices=jax.devices()[:4])


def test_grpo_trains_pipelined_and_samples_its_rounds_unpipelined(config, tmp_path):
  """GRPO on pipeline=2 x data=2: the engine samples each round from the trainer's params
  with the layers unstacked (decoding runs without a pipeline), the policy and reference
  passes are pipelined; the losses are those of data=2 alone."""
  words = np.random.default_rng(0).choice(list("abcdfgh"), (200, 4))
  with open(tmp_path / "prompts.jsonl", "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": f"Say {''.join(w)}", "answer": "".join(w)}) + "\n")
  config.train.update(objective="grpo", steps=3, batch_size=16, checkpoint_every=3,
                      eval_every=3)
  config.train.grpo.update(num_generations=4, max_new_tokens=8, beta=0.04, num_iterations=2,
                           rewards="exact_match,similarity", eval_prompts=8)
  config.data.update(source="jsonl", paths=str(tmp_path / "prompts.jsonl"), seq_len=32)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  config.mesh.data = 2
  train(config, tmp_path / "dp", devices=jax.devices()[:2])
  config.mesh.pipeline = 2
  train(config, tmp_path / "pp", devices=jax.devices()[:4])
  dp, pp = _records(tmp_path / "dp"), _records(tmp_path / "pp")
  for name in ("loss", "reward", "kl"):
    np.testing.assert_allclose([pp[s][name] for s in dp], [dp[s][name] for s in dp],
                               rtol=1e-4, atol=1e-7, err_msg=name)
  assert dp[2]["kl"] > 0


def _records(workdir) -> dict[int, dict]:
  """The training record (loss and the rest) of each step in metrics.jsonl."""
  out = {}
  for line in open(workdir / "metrics.jsonl"):
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r
  return out


MOE_CASES = {
    # experts split inside each stage (dropless all-gather / reduce-scatter), circular, in
    # a layer pattern (MoE every 2nd layer, local/global windows): the scanned unit is a
    # group of two blocks
    "p2xexpert2xfsdp2-circular-pattern": (
        dict(pipeline=2, expert=2, fsdp=2),
        dict(n_layers=8, pipeline_repeats=2, sliding_window=8, sliding_window_pattern=2),
        dict(every=2, load_balance_weight=0.01, router_z_weight=0.001), 2),
    # DeepSeek-V3's routing: a dense first layer outside the stages, a shared expert, and
    # the balancing bias (sown corrections summed over microbatches), circular
    "p4xexpert2-deepseek": (
        dict(pipeline=4, expert=2), dict(n_layers=9, pipeline_repeats=2),
        dict(router="sigmoid", routed_bias_update_rate=0.01, first_dense=1, n_shared=1), 4),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_pipeline_matches_grad_accumulation_over_the_same_microbatches(config, tmp_path,
                                                                           case):
  """MoE layers in the stages: what they sow (auxiliary losses, metrics, balancing-bias
  corrections) is collected per layer and microbatch, masked in the bubble, so a
  pipeline of M microbatches is a 1-device run with train.grad_accum=M (whose
  microbatches are the same rows): equal losses, auxiliary losses and router biases."""
  from llm.workdir import load_params
  mesh, model, moe, micro = MOE_CASES[case]
  config.model.update(mlp="moe", **model)
  config.model.moe.update(n_experts=4, top_k=2, **moe)
  config.train.update(steps=3, checkpoint_every=3, eval_every=3, pipeline_microbatches=micro)
  config.train.grad_accum = micro
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.train.grad_accum = 1
  config.mesh.update(data=1, **mesh)
  train(config, tmp_path / "pp")
  records = {run: _records(tmp_path / run) for run in ("one", "pp")}
  names = ["loss", "objective"] + [k for k in records["one"][1] if k.startswith("moe_") and
                                   k.endswith("_loss")]
  assert "moe_load_balance_loss" in names
  for name in names:  # the router's z-loss (logsumexp squared) is the touchiest
    np.testing.assert_allclose([records["pp"][s][name] for s in (1, 2, 3)],
                               [records["one"][s][name] for s in (1, 2, 3)],
                               rtol=2e-5 if name in ("loss", "objective") else 1e-4,
                               err_msg=name)
  if moe.get("routed_bias_update_rate"):
    (_, one), (_, pp) = load_params(tmp_path / "one"), load_params(tmp_path / "pp")
    bias_one = np.asarray(one["layers"]["mlp"]["router_bias"])  # [8 MoE layers, 4]
    np.testing.assert_array_equal(np.asarray(pp["layers"]["mlp"]["router_bias"]), bias_one)
    assert np.abs(bias_one).max() > 0.01  # moved by more than one step's rate somewhere


def test_checkpoints_move_between_pipeline_layouts(config, tmp_path, one_device, capsys):
  """Saved at step 2 on pipeline=4 x fsdp=2, resumed on one device (no pipeline) to step 3,
  then back onto pipeline=2 x data=4 with 2 accumulation steps to step 4: the losses of
  the uninterrupted run."""
  config = _config(config)
  config.mesh.update(data=1, pipeline=4, fsdp=2)
  config.train.steps = 2
  train(config, tmp_path)
  config.mesh.update(pipeline=1, fsdp=1)
  config.train.update(steps=3, checkpoint_every=1)
  train(config, tmp_path, devices=jax.devices()[:1])
  config.mesh.update(pipeline=2, data=4)
  config.train.update(steps=4, grad_accum=2, pipeline_microbatches=1)
  capsys.readouterr()
  train(config, tmp_path)
  assert "resumed from step 3" in capsys.readouterr().out
  got = losses(tmp_path)
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [one_device[s] for s in range(1, 5)],
                             rtol=2e-5)


def test_lora_trains_through_the_pipeline(config, tmp_path):
  """Adapters (only they train) through pipeline=4 x data=2: the 1-device losses."""
  config = _config(config)
  config.model.lora.update(rank=4, targets="q,v,down")
  config.train.steps = 3
  train(config, tmp_path / "one", devices=jax.devices()[:1])
  config.mesh.update(data=2, pipeline=4)
  train(config, tmp_path / "pp")
  one, pp = losses(tmp_path / "one"), losses(tmp_path / "pp")
  np.testing.assert_allclose([pp[s] for s in one], [one[s] for s in one], rtol=2e-5)


@pytest.mark.parametrize("change,message", [
    (dict(model=dict(n_layers=6)), r"model.n_layers=6 must be divisible by mesh.pipeline=4 x "
                                   r"model.pipeline_repeats=1"),
    (dict(model=dict(pipeline_repeats=2), train=dict(pipeline_microbatches=2)),
     r"needs train.pipeline_microbatches >= mesh.pipeline=4"),
    (dict(train=dict(pipeline_microbatches=3)), r"must split into train.pipeline_microbatches=3"),
    (dict(model=dict(sliding_window=4, sliding_window_pattern=2, pipeline_repeats=2),
          train=dict(pipeline_microbatches=4)),
     r"model.n_layers=8 must be divisible by mesh.pipeline=4 x model.pipeline_repeats=2 x "
     r"the layers' repeating pattern 2"),
    (dict(model=dict(scan_layers=False)), r"model.scan_layers=False has none"),
    (dict(train=dict(objective="grpo", sampler="decoder")), r"train.sampler='decoder' decodes "
                                                            r"the scanned stack"),
])
def test_pipelines_the_schedule_cannot_run_are_refused(config, change, message):
  """Checked with the batch, before any data or compile (llm.training.step.check_batch)."""
  from llm.parallel.mesh import make_mesh
  from llm.training.step import check_batch
  config = _config(config)
  config.mesh.update(data=2, pipeline=4)
  for section, values in change.items():
    config[section].update(values)
  with pytest.raises(ValueError, match=message):
    check_batch(config, make_mesh(config.mesh))


def test_bubble_fraction_is_the_schedules_idle_share():
  """(P - 1) / (R M + P - 1): each of P stages is busy R M of the R M + P - 1 iterations."""
  for p, r, m in [(4, 1, 4), (4, 2, 4), (2, 1, 8), (8, 3, 16)]:
    busy, iterations = p * r * m, r * m + p - 1
    assert pipeline.bubble_fraction(p, r, m) == pytest.approx(1 - busy / (p * iterations))


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_the_planner_compiles_a_pipeline_and_counts_its_bubble_and_transfers(config):
  """A v5e-4 AOT compile with pipeline=2 x fsdp=2: the predicted compute includes the
  bubble ((M + P - 1) / M of the work) and the traffic the stage-to-stage permutes;
  --search offers pipeline layouts, for MoE models too, and one (pipeline=2 x expert=2)
  compiles."""
  from llm import plan
  from llm.flops import recomputed_flops_per_token
  assert {"pipeline": 2, "data": 1, "fsdp": 2, "tensor": 1, "sequence": 1} in \
      plan.mesh_candidates(4, 0, n_layers=8)
  assert {"pipeline": 2, "data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, "expert": 2} in \
      plan.mesh_candidates(4, 8, n_layers=8)  # MoE: stages with experts split
  assert not any("pipeline" in m for m in plan.mesh_candidates(4, 8, n_layers=3))
  config = _config(config)
  config.model.update(d_model=128, n_heads=4, n_kv_heads=2, d_ff=256)
  config.mesh.update(data=1, pipeline=2, fsdp=2)
  config.train.pipeline_microbatches = 2
  p = plan.compile_step(config, plan.tpu_target("v5e-4"))
  tokens = config.train.batch_size * config.data.seq_len
  work = recomputed_flops_per_token(config.model, config.data.seq_len) * tokens / 4
  assert p.flops_per_chip == pytest.approx(work * (2 + 2 - 1) / 2)
  assert p.traffic.collectives.get("collective-permute", 0) > 0
  assert p.mesh["pipeline"] == 2
  # MoE stages with their experts split (capacity: all-to-all inside each stage)
  config.model.update(mlp="moe", dtype="bfloat16")
  config.model.moe.update(n_experts=4, top_k=2, compute="capacity")
  config.mesh.update(fsdp=1, expert=2)
  p = plan.compile_step(config, plan.tpu_target("v5e-4"))
  assert p.traffic.collectives["all-to-all"] > 0 and p.traffic.collectives["collective-permute"] > 0
