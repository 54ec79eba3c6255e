"""The step-time model: HLO traffic counted by hand on modules compiled here, loops
multiplied by their trip counts, collectives by group size, and the roofline."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm import cost_model


def _scan_matmul_hlo(trips: int) -> str:
  def f(x, ws):
    def body(carry, w):
      return jnp.tanh(carry @ w), None
    return jax.lax.scan(body, x, ws)[0]

  x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
  ws = jax.ShapeDtypeStruct((trips, 512, 512), jnp.float32)
  return jax.jit(f).lower(x, ws).compile().as_text()


def test_loop_bodies_count_once_per_trip():
  one, two = (cost_model.analyse(_scan_matmul_hlo(n), 1).hbm_bytes for n in (8, 16))
  # each trip reads the carry [256, 512] and one weight [512, 512] and writes the carry:
  # at least 1.5 MiB per trip; doubling the trips adds 8 more trips of it
  per_trip = (2 * 256 * 512 + 512 * 512) * 4
  assert two - one >= 8 * per_trip * 0.99
  assert two - one <= 8 * per_trip * 4  # not the whole [16, 512, 512] stack per trip
  assert one >= 8 * per_trip * 0.99


def test_collective_bytes_per_chip_follow_the_group_size():
  from jax.sharding import Mesh
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("a", "b"))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", None),
                     check_vma=False)
  def gather(x):  # all-gather over the 4 chips of axis b
    return jax.lax.all_gather(x, "b", axis=1, tiled=True)

  x = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=NamedSharding(mesh, P("a", "b")))
  traffic = cost_model.analyse(gather.lower(x).compile().as_text(), 8)
  result = 32 * 1024 * 4  # this chip's gathered block [32, 1024] fp32
  assert traffic.collectives["all-gather"] == pytest.approx(result * 3 / 4)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b"))
  def summed(x):  # all-reduce over all 8 chips
    return jax.lax.psum(x, ("a", "b"))

  traffic = cost_model.analyse(summed.lower(x).compile().as_text(), 8)
  assert traffic.collectives["all-reduce"] == pytest.approx(2 * 32 * 256 * 4 * 7 / 8)


def test_parser_reads_trip_counts_dynamic_slices_and_replica_groups():
  hlo = """HloModule m

%cond (p: (s32[], f32[10,128])) -> pred[] {
  %p = (s32[], f32[10,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fused (param_0: f32[10,128], param_1: s32[]) -> f32[1,128] {
  %param_0 = f32[10,128]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,128]{1,0} dynamic-slice(%param_0, %param_1, %z), dynamic_slice_sizes={1,128}
}

%body (p: (s32[], f32[10,128])) -> (s32[], f32[10,128]) {
  %p = (s32[], f32[10,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %buf = f32[10,128]{1,0} get-tuple-element(%p), index=1
  %row = f32[1,128]{1,0} fusion(%buf, %i), kind=kLoop, calls=%fused
  %ag = f32[4,128]{1,0} all-gather(%row), replica_groups=[2,4]<=[8], dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[10,128]{1,0}) tuple(%next, %buf)
}

ENTRY %main (x: f32[10,128]) -> f32[10,128] {
  %x = f32[10,128]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[10,128]{1,0}) tuple(%zero, %x)
  %w = (s32[], f32[10,128]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[10,128]{1,0} get-tuple-element(%w), index=1
}
"""
  traffic = cost_model.analyse(hlo, 8)
  row = 128 * 4
  # per trip: the fusion reads one row (not the buffer) and its index and writes a row;
  # the all-gather reads a row and writes 4; the add moves 3 scalars
  assert traffic.hbm_bytes == pytest.approx(10 * ((2 * row + 4) + 5 * row + 12))
  assert traffic.sync_collective_bytes == pytest.approx(10 * 4 * row * 3 / 4)
  assert traffic.async_collective_bytes == 0


def test_roofline_takes_the_slowest_resource_plus_exposed_collectives():
  traffic = cost_model.Traffic(hbm_bytes=2e9, sync_collective_bytes=1e8,
                               async_collective_bytes=5e8)
  p = cost_model.predict(traffic, model_flops_per_chip=3e12, executed_flops_per_chip=4e12,
                         tokens_per_chip=8192, peak_flops=1e14, hbm_bandwidth=1e11,
                         ici_bandwidth=1e10)
  assert p.compute_seconds == pytest.approx(0.04) and p.hbm_seconds == pytest.approx(0.02)
  assert p.async_collective_seconds == pytest.approx(0.05)
  assert p.step_seconds == pytest.approx(0.05 + 0.01) and p.bound == "collectives"
  assert p.mfu == pytest.approx(3e12 / (0.06 * 1e14))
  assert p.tokens_per_second_per_chip == pytest.approx(8192 / 0.06)


def test_async_all_gather_counts_its_result_and_can_overlap():
  hlo = """HloModule m

ENTRY %main (x: f32[8,128]) -> f32[32,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %ags = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%x), replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %agd = f32[32,128]{1,0} all-gather-done(%ags)
}
"""
  traffic = cost_model.analyse(hlo, 4)
  assert traffic.async_collective_bytes == pytest.approx(32 * 128 * 4 * 3 / 4)
  assert traffic.sync_collective_bytes == 0


def test_cross_slice_host_transfers_count_as_dcn_traffic():
  """Multislice: the TPU compiler hands the cross-slice part of a collective to the
  megascale runtime as `send`s; per chip an all-reduce over s slices moves 2 X (s-1)/s,
  an all-gather of pieces X moves X (s-1), a one-to-one transfer X, inside loops per trip."""
  mega = ('is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
          '"xla_megascale_runtime",_xla_megascale_target="{1,2,3,4}x{0:3}",'
          '_xla_megascale_transfer_type="%s"}')
  hlo = f"""HloModule m

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {{
  %p = (s32[], f32[64,128]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,128]{{1,0}} get-tuple-element(%p), index=1
  %t = token[] after-all()
  %s = (f32[64,128]{{1,0}}, u32[], token[]) send(%x, %t), channel_id=1, {mega % "ONE_TO_ONE"}
  %sd = token[] send-done(%s), channel_id=1
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[64,128]{{1,0}}) tuple(%j, %x)
}}

%cond (p: (s32[], f32[64,128])) -> pred[] {{
  %p = (s32[], f32[64,128]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

ENTRY %main (x: f32[64,128]) -> f32[64,128] {{
  %x = f32[64,128]{{1,0}} parameter(0)
  %t = token[] after-all()
  %ar = (f32[64,128]{{1,0}}, u32[], token[]) send(%x, %t), channel_id=2, {mega % "ALL_REDUCE"}
  %ard = token[] send-done(%ar), channel_id=2
  %ag = (f32[64,128]{{1,0}}, u32[], token[]) send(%x, %t), channel_id=3, {mega % "ALL_GATHER"}
  %agd = token[] send-done(%ag), channel_id=3
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,128]{{1,0}}) tuple(%zero, %x)
  %loop = (s32[], f32[64,128]{{1,0}}) while(%init), condition=%cond, body=%body
  ROOT %y = f32[64,128]{{1,0}} get-tuple-element(%loop), index=1
}}
"""
  x = 64 * 128 * 4
  traffic = cost_model.analyse(hlo, 16)
  assert traffic.dcn_bytes == pytest.approx(2 * x * 3 / 4 + x * 3 + 3 * x)
  assert traffic.async_collective_bytes == traffic.sync_collective_bytes == 0
  p = cost_model.predict(traffic, model_flops_per_chip=1e9, executed_flops_per_chip=1e9,
                         tokens_per_chip=1, peak_flops=1e15, hbm_bandwidth=1e12,
                         ici_bandwidth=1e11, dcn_bandwidth=1e9)
  assert p.dcn_seconds == pytest.approx(traffic.dcn_bytes / 1e9) and p.bound == "DCN"
  with pytest.raises(ValueError, match="give the DCN bandwidth"):
    cost_model.predict(traffic, model_flops_per_chip=1e9, executed_flops_per_chip=1e9,
                       tokens_per_chip=1, peak_flops=1e15, hbm_bandwidth=1e12,
                       ici_bandwidth=1e11)
