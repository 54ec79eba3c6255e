"""The AOT planner: compiles the real train step for a TPU topology on this CPU host."""

import importlib.util

import numpy as np

import pytest

from llm import plan

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


def test_topology_names_are_checked():
  with pytest.raises(ValueError, match=r"--topology='v5e-12': 12 chips is not a v5e slice size"):
    plan.tpu_target("v5e-12")
  with pytest.raises(ValueError, match="expected a TPU slice like v5e-16"):
    plan.tpu_target("v5e16")
  with pytest.raises(ValueError, match="GPU targets need deviceless CUDA compilation"):
    plan.tpu_target("h100-8")


@needs_libtpu
def test_plan_reports_memory_that_matches_the_sharded_state(config):
  target = plan.tpu_target("v5e-4")
  assert len(target.devices) == 4 and target.hbm_bytes == 16 * plan.GIB
  config.model.update(d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, dtype="bfloat16")
  config.mesh.update(data=1, fsdp=4)
  config.train.batch_size = 8
  p = plan.compile_step(config, target)
  assert p.mesh["fsdp"] == 4 and p.per_chip_batch == 2 and not p.compiler_oom
  # arguments = this chip's shards of params + optimizer state + batch
  from llm.model import make_model
  from llm.parallel.mesh import make_mesh
  from llm.training.optim import make_optimizer
  from llm.training.state import state_shardings
  mesh = make_mesh(config.mesh, target.devices)
  abstract, _ = state_shardings(make_model(config.model), make_optimizer(config.optim, 8),
                                config.data.seq_len, mesh)
  batch_bytes = 5 * 4 * config.train.batch_size * config.data.seq_len // 4
  state_bytes = plan._shard_bytes(abstract) + batch_bytes
  assert state_bytes <= p.argument_bytes < 1.3 * state_bytes  # TPU tiles pad small arrays
  assert p.total_bytes < target.hbm_bytes
  table = plan.table([p], target.hbm_bytes)
  assert "| fsdp=4 | none | 8 (2) |" in table and "| yes |" in table
  # activations grow with the batch; parameters and optimizer state do not
  config.train.batch_size, config.data.seq_len = 64, 256
  bigger = plan.compile_step(config, target)
  assert bigger.temp_bytes > p.temp_bytes + 8 * 64 * 256 * 256 * 2 // 4
  assert bigger.flops_per_chip > 8 * p.flops_per_chip


@needs_libtpu
def test_search_ranks_layouts_and_flags_what_does_not_fit(config):
  target = plan.tpu_target("v5e:2x2")
  config.model.update(d_model=256, n_heads=4, n_kv_heads=4, d_ff=512)
  config.train.batch_size = 8
  meshes = [dict(data=1, fsdp=4, tensor=1, sequence=1), dict(data=2, fsdp=1, tensor=2, sequence=1)]
  assert all(m in plan.mesh_candidates(4) for m in meshes)
  results = plan.plan(config, target, search=True, meshes=meshes, remats=("none", "dots", "full"))
  plans = [r for r in results if isinstance(r, plan.Plan)]
  assert {p.remat for p in plans} == {"none", "full", "dots"}
  assert any(p.mesh["tensor"] == 2 for p in plans) and any(p.mesh["data"] == 2 for p in plans)
  best = plan.rank(results, target.hbm_bytes)
  # ranked by predicted throughput; recomputing the forward is predicted slower
  speeds = [p.prediction.tokens_per_second_per_chip for p in best]
  assert speeds == sorted(speeds, reverse=True) and len(best) == len(plans)
  by_remat = {(p.remat, p.mesh["tensor"]): p.prediction for p in plans}
  assert by_remat[("none", 1)].compute_seconds < by_remat[("full", 1)].compute_seconds
  for p in plans:  # compute time is the step's FLOPs at the v5e's peak
    assert p.prediction.compute_seconds == pytest.approx(p.flops_per_chip / 197e12)
    assert p.prediction.step_seconds >= p.prediction.compute_seconds
  assert "tokens/s/chip (pred.)" in plan.table(results, target.hbm_bytes)
  # a budget between the smallest and largest plan keeps only those below it
  sizes = sorted(p.total_bytes for p in plans)
  budget = sizes[len(sizes) // 2]
  assert all(p.total_bytes <= budget for p in plan.rank(results, budget))
  assert len(plan.rank(results, budget)) < len(plans)


@needs_libtpu
def test_offload_moves_layer_inputs_to_host_memory(config):
  target = plan.tpu_target("v5e-4")
  config.model.update(d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, n_layers=8,
                      dtype="bfloat16")
  config.data.seq_len = 1024
  config.mesh.update(data=1, fsdp=4)
  config.train.batch_size = 16
  config.model.remat = "full"
  full = plan.compile_step(config, target)
  config.model.remat = "offload"
  offload = plan.compile_step(config, target)
  # the 8 layer inputs [4, 1024, 256] bf16 per chip go to the host instead of HBM
  layer_inputs = 8 * 4 * 1024 * 256 * 2
  assert offload.host_temp_bytes >= layer_inputs and full.host_temp_bytes == 0
  assert offload.temp_bytes <= full.temp_bytes - layer_inputs // 2


@needs_libtpu
def test_multislice_mesh_keeps_only_data_across_slices(config):
  target = plan.tpu_target("v5e-4", num_slices=2)
  assert len(target.devices) == 8
  from llm.parallel.mesh import make_mesh
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(config.mesh, target.devices)
  slice_of = {d.id: d.slice_index for d in target.devices}

  def whole_slices(mesh, axis):  # every index along `axis` is one whole slice
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), 0)
    return all({slice_of[d.id] for d in devices[i].flat} == {i} for i in range(2))

  assert whole_slices(mesh, "data")
  config.model.update(d_model=128, n_heads=4, n_kv_heads=2, d_ff=256)
  p = plan.compile_step(config, target)
  assert p.mesh == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  # the gradients' all-reduce over the 2 slices: at least each chip's fp32 share of them
  # (X = 4 params / 4 chips a slice; 2 X (2 - 1) / 2) goes over DCN, at its bandwidth
  from llm.params import count_params
  assert p.traffic.dcn_bytes >= count_params(config.model) * 4 / 4
  assert p.prediction.dcn_seconds == pytest.approx(
      p.traffic.dcn_bytes / target.generation.dcn_bandwidth)
  assert plan.compile_step(config, plan.tpu_target("v5e-8")).traffic.dcn_bytes == 0
  config.mesh.update(pipeline=2, data=1)  # a pipeline crosses the slices instead of data
  assert whole_slices(make_mesh(config.mesh, target.devices), "pipeline")
  assert plan.compile_step(config, target).traffic.dcn_bytes > 0  # the stages' transfers
  config.mesh.update(pipeline=1, data=1, fsdp=8, tensor=1)
  with pytest.raises(ValueError, match=r"span 2 slices, so mesh.data=1 \(or mesh.pipeline=1\) "
                     "must be a multiple"):
    make_mesh(config.mesh, target.devices)


@needs_libtpu
def test_moe_with_megablox_compiles_for_tpu_with_expert_parallelism(config):
  """The MoE layer's grouped matmuls are Mosaic kernels (megablox gmm forward, gmm + tgmm
  backward) on a v5e-4 with the experts split 4 ways."""
  config.model.update(d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, mlp="moe", n_layers=2,
                      dtype="bfloat16")
  config.model.moe.update(n_experts=8, top_k=2, compute="megablox")
  config.mesh.update(data=1, expert=4)
  config.train.batch_size = 8
  p = plan.compile_step(config, plan.tpu_target("v5e-4"))
  assert p.mesh == {"data": 1, "expert": 4, "fsdp": 1, "tensor": 1, "sequence": 1}
  assert p.pallas_kernels >= 3 * 3  # gate, up, down: forward gmm, backward gmm and tgmm
  # without an expert axis (FSDP, as MaxText runs Mixtral) each chip runs the kernel on
  # its own tokens with the experts gathered
  config.mesh.update(expert=1, fsdp=4)
  p = plan.compile_step(config, plan.tpu_target("v5e-4"))
  assert p.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1}
  assert p.pallas_kernels >= 3 * 3
