"""Will it fit? Compile the real train step ahead of time for a TPU topology, on this host.

  python -m llm.plan --config=configs/llama2_7b.py --topology=v5e-16 \\
      [--per_chip_batch=4 | --config.train.batch_size=64] [--search]

libtpu (pip install -e ".[tpu]") compiles for a topology without any TPU attached
(jax.experimental.topologies). Prints per-chip memory (arguments = params + optimizer
state + batch, temporaries, total against the chip's HBM), FLOPs per step and whether it
fits, and a predicted step time, tokens/s per chip and MFU with what bounds it (compute,
HBM or collectives; llm.cost_model reads the compiled HLO). --search compiles every mesh
layout x remat policy candidate and ranks those that fit by predicted throughput.

FLOPs are the model's (6 x params + attention per token, as in the training MFU), plus
the forward recomputed under remat; XLA's own cost analysis counts a scanned layer once,
so it is not used. Host memory (remat="offload" keeps each layer's input there) is
reported beside HBM.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import time

import jax
from absl import app, flags

import pallas_kernels.flash_attention as flash
from llm import cli
from llm import config as config_lib
from llm import cost_model, objectives
from llm.flops import flops_per_token, recomputed_flops_per_token
from llm.hardware import GIB, TPU_GENERATIONS, TpuGeneration, slice_grid
from llm.model import make_model, quant
from llm.model.transformer import REMAT_POLICIES
from llm.parallel import pipeline
from llm.parallel.mesh import make_mesh, use_mesh
from llm.parallel.rules import batch_sharding as make_batch_sharding
from llm.training.optim import make_optimizer
from llm.training.state import state_shardings
from llm.training.step import check_batch, jit_train_step

@dataclasses.dataclass
class Target:
  name: str
  devices: list
  hbm_bytes: int
  generation: TpuGeneration | None = None


def tpu_target(name: str, num_slices: int = 1) -> Target:
  """'v5e-16' (Cloud TPU slice name) or 'v5e:4x4' (explicit chip grid), `num_slices` of
  them joined over DCN (multislice)."""
  gens = "|".join(TPU_GENERATIONS)
  m = re.fullmatch(rf"({gens})-(\d+)", name) or re.fullmatch(rf"({gens}):([\dx]+)", name)
  if not m and re.match(r"(?i)(h100|h200|a100|b200|gpu)", name):
    raise ValueError(f"--topology={name!r}: GPU targets need deviceless CUDA compilation (the "
                     "jax CUDA plugin with a GPU target description), which this planner does "
                     "not drive yet; TPU slices only, e.g. v5e-16")
  if not m:
    raise ValueError(f"--topology={name!r}: expected a TPU slice like v5e-16, v6e-64, v5p-128, "
                     f"v4-32 or a grid like v5e:4x4; generations: {sorted(TPU_GENERATIONS)}")
  gen, size = m.groups()
  generation = TPU_GENERATIONS[gen]
  prefix, hbm = generation.topology, generation.hbm_bytes
  grid = size if ":" in name else slice_grid(gen, int(size), f"--topology={name!r}")
  # Several processes may compile for TPUs on one host (none of them owns a chip).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError("the planner needs libtpu to compile for TPUs: pip install -e '.[tpu]'")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(f"{prefix}:{grid}", platform="tpu", num_slices=num_slices)
  except Exception as err:  # noqa: BLE001 (a shape libtpu rejects)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ValueError(f"--topology={name!r}: libtpu cannot describe a {prefix}:{grid} slice "
                     f"({first}); use a slice name like {gen}-16 or a grid of a real "
                     f"{gen} slice") from err
  label = name if num_slices == 1 else f"{num_slices} x {name}"
  return Target(label, list(topo.devices), hbm, generation)


@dataclasses.dataclass
class Plan:
  mesh: dict
  remat: str
  batch_size: int
  per_chip_batch: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops_per_chip: float  # model FLOPs of one step on one chip, recomputation included
  compile_seconds: float
  compiler_oom: bool = False  # the compiler refused: temporaries alone exceed HBM
  pallas_kernels: int = 0  # Mosaic (Pallas TPU) kernels in the compiled step
  int8_matmuls: int = 0  # dots / convolutions on s8 operands in the compiled step
  host_temp_bytes: int = 0  # host memory per chip's share (remat="offload")
  model_flops_per_chip: float = 0.0  # without recomputation (what MFU counts)
  tokens_per_chip: float = 0.0
  traffic: cost_model.Traffic | None = None
  prediction: cost_model.Prediction | None = None

  @property
  def total_bytes(self) -> int:
    """Peak live bytes per chip: inputs, non-aliased outputs, temporaries, code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + \
        self.code_bytes


def compile_step(config, target: Target) -> Plan:
  """AOT-compiles train_step for `config` on the target's devices; reads its memory/cost."""
  config_lib.validate(config)
  second = objectives.get(config).bind(config)
  if second:
    raise ValueError(f"train.objective={config.train.objective!r} runs a second model in its "
                     f"step ({', '.join(second)}); llm.plan compiles the steps of one model")
  mesh = make_mesh(config.mesh, target.devices)
  check_batch(config, mesh)
  model = quant.for_training(make_model(config.model, config.train.pipeline_microbatches),
                             config.train.quantization)
  tx = make_optimizer(config.optim, config.train.steps)
  abstract_state, shardings_ = state_shardings(model, tx, config.data.seq_len, mesh)
  batch_sharding = make_batch_sharding(mesh)
  batch = objectives.get(config).abstract_batch(config, batch_sharding)
  step = jit_train_step(config, objectives.loss_fn(config, model), tx, shardings_, batch_sharding)
  tokens = config.train.batch_size * config.data.seq_len
  # the expert and pipeline axes are listed only when used
  shown = {a: n for a, n in mesh.shape.items() if a not in ("expert", "pipeline") or n > 1}
  n = len(target.devices)
  # a pipeline's stages also compute in its bubble: (R M + P - 1) / (R M) of the work
  stages = pipeline.stages(mesh)
  bubble = 1 / (1 - pipeline.bubble_fraction(
      stages, config.model.pipeline_repeats,
      pipeline.microbatch_count(config.train.pipeline_microbatches, stages)))
  common = dict(mesh=shown, remat=config.model.remat,
                batch_size=config.train.batch_size,
                per_chip_batch=config.train.batch_size / n,
                flops_per_chip=recomputed_flops_per_token(config.model, config.data.seq_len) *
                tokens / n * bubble,
                model_flops_per_chip=flops_per_token(config.model, config.data.seq_len) * tokens / n,
                tokens_per_chip=tokens / n)
  t0 = time.perf_counter()
  try:
    with flash.force_backend("tpu"), use_mesh(mesh):
      compiled = step.lower(abstract_state, batch).compile()
  except jax.errors.JaxRuntimeError as err:
    needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or not needed:
      raise
    # The compiler stops at the first allocation that cannot fit; report what it needed.
    return Plan(**common, argument_bytes=_shard_bytes(abstract_state) + _shard_bytes(batch),
                output_bytes=0, alias_bytes=0, temp_bytes=int(float(needed.group(1)) * GIB),
                code_bytes=0, compile_seconds=time.perf_counter() - t0, compiler_oom=True)
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  result = Plan(**common, argument_bytes=mem.argument_size_in_bytes,
                output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
                compile_seconds=time.perf_counter() - t0,
                pallas_kernels=hlo.count('custom_call_target="tpu_custom_call"'),
                host_temp_bytes=getattr(mem, "host_temp_size_in_bytes", 0),
                traffic=cost_model.analyse(hlo, n))
  result.int8_matmuls = cost_model.int8_matmuls(hlo)
  if target.generation is not None:
    g = target.generation
    result.prediction = cost_model.predict(
        result.traffic, model_flops_per_chip=result.model_flops_per_chip,
        executed_flops_per_chip=result.flops_per_chip, tokens_per_chip=result.tokens_per_chip,
        peak_flops=effective_peak(config, g), hbm_bandwidth=g.hbm_bandwidth,
        ici_bandwidth=g.ici_bandwidth, dcn_bandwidth=g.dcn_bandwidth)
  return result


def quantized_share(model_cfg, seq_len: int) -> float:
  """Of a token's matmul FLOPs, the share train.quantization runs quantized: every weight
  matmul but the embedding's and the LM head's (attention's scores stay float)."""
  from llm.params import active_params
  c = model_cfg
  head = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  return 6 * (active_params(c) - head) / flops_per_token(c, seq_len)


def effective_peak(config, generation: TpuGeneration) -> float:
  """The chip's peak for this step: bf16, or with train.quantization=int8 the int8 peak on
  the quantized share of the FLOPs (time = q / int8 peak + (1 - q) / bf16 peak). fp8 is
  counted at the bf16 peak (these TPU generations have no fp8 MXU rate above it)."""
  bf16 = generation.peak_bf16_flops
  if config.train.quantization != "int8" or not generation.peak_int8_ops:
    return bf16
  q = quantized_share(config.model, config.data.seq_len)
  return 1.0 / (q / generation.peak_int8_ops + (1 - q) / bf16)


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def mesh_candidates(n_chips: int, n_experts: int = 0, n_layers: int = 0) -> list[dict]:
  """Layouts worth trying: FSDP across everything, FSDP x tensor, data x FSDP, and for a
  MoE model (n_experts > 0) each of those with experts split 2, 4, 8 or 16 ways; for a
  scanned stack of n_layers pipelined units (> 0), each of those with the layers in 2 or
  4 pipeline stages (with experts split too, only without tensor parallelism)."""
  out = []
  experts = [1] + [e for e in (2, 4, 8, 16) if n_experts and n_experts % e == 0]
  stages = [1] + [p for p in (2, 4) if n_layers and n_layers % p == 0]
  for expert, stage in itertools.product(experts, stages):
    for tensor in (1, 2, 4, 8) if stage == 1 or expert == 1 else (1,):
      for data in (1, 2, 4):
        if n_chips % (expert * tensor * data * stage) == 0:
          mesh = dict(data=data, fsdp=n_chips // (expert * tensor * data * stage),
                      tensor=tensor, sequence=1)
          mesh = {**mesh, "expert": expert} if expert > 1 else mesh
          out.append({"pipeline": stage, **mesh} if stage > 1 else mesh)
  return out


def _fmt_mesh(mesh: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 chip"


def failure(mesh: dict, remat: str, batch_size: int, err: Exception) -> tuple:
  """A table row for a candidate that could not be compiled at all."""
  return mesh, remat, batch_size, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def table(plans: list[Plan | tuple], hbm: int) -> str:
  rows = ["| mesh | remat | batch (per chip) | args GiB | temps GiB | total GiB | HBM GiB | fits "
          "| host GiB | TFLOP/step/chip | step (pred.) | tokens/s/chip (pred.) | MFU (pred.) "
          "| bound |",
          "|------|-------|-----------------:|---------:|----------:|----------:|--------:|:----:"
          "|---------:|----------------:|------:|------:|------:|:----|"]
  for p in plans:
    if isinstance(p, tuple):  # (mesh, remat, batch, error)
      mesh, remat, batch, err = p
      rows.append(f"| {_fmt_mesh(mesh)} | {remat} | {batch} | – | – | – | {hbm / GIB:.0f} | no "
                  f"| – | – | – | – | – | {err} |")
      continue
    fits = "yes" if p.total_bytes <= hbm else "no (compiler)" if p.compiler_oom else "no"
    pred = p.prediction
    speed = ("– | – | – | –" if pred is None else
             f"{_seconds(pred.step_seconds)} | {pred.tokens_per_second_per_chip:,.0f} | "
             f"{100 * pred.mfu:.1f}% | {pred.bound}")
    rows.append(f"| {_fmt_mesh(p.mesh)} | {p.remat} | {p.batch_size} ({p.per_chip_batch:g}) | "
                f"{p.argument_bytes / GIB:.2f} | {p.temp_bytes / GIB:.2f} | "
                f"{p.total_bytes / GIB:.2f} | {hbm / GIB:.0f} | {fits} | "
                f"{p.host_temp_bytes / GIB:.2f} | {p.flops_per_chip / 1e12:.1f} | {speed} |")
  return "\n".join(rows)


def plan(config, target: Target, search: bool = False, meshes: list[dict] | None = None,
         remats: tuple[str, ...] = tuple(REMAT_POLICIES)) -> list[Plan | tuple]:
  """One compile of `config`, or with `search` one per (mesh, remat) candidate."""
  if not search:
    return [compile_step(config, target)]
  results = []
  n_experts = config.model.moe.n_experts if config.model.mlp == "moe" else 0
  layers, unit = config_lib.scan_unit(config.model)
  units = layers // unit if config.model.scan_layers else 0  # what a pipeline splits
  meshes = (mesh_candidates(len(target.devices), n_experts, units) if meshes is None
            else meshes)
  for mesh, remat in itertools.product(meshes, remats):
    c = config_lib.from_json(config_lib.to_json(config))
    c.mesh.update({"expert": 1, "pipeline": 1, **mesh})
    c.model.remat = remat
    try:
      results.append(compile_step(c, target))
    except Exception as err:  # noqa: BLE001 (does not divide, or the compiler ran out of memory)
      results.append(failure(mesh, remat, c.train.batch_size, err))
  return results


def rank(results: list, hbm: int) -> list[Plan]:
  """Plans that fit, by predicted tokens/s per chip (highest first; without a prediction:
  least recomputation), then least memory."""
  fits = [p for p in results if isinstance(p, Plan) and p.total_bytes <= hbm]
  return sorted(fits, key=lambda p: (
      -p.prediction.tokens_per_second_per_chip if p.prediction else 0.0,
      list(REMAT_POLICIES).index(p.remat), p.mesh["tensor"], p.total_bytes))


def _seconds(t: float) -> str:
  return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def _speed(p: Plan) -> str:
  pred = p.prediction
  if pred is None:
    return ""
  return (f"; predicted {_seconds(pred.step_seconds)}/step, {pred.tokens_per_second_per_chip:,.0f} "
          f"tokens/s/chip, MFU {100 * pred.mfu:.1f}% ({pred.bound}-bound)")


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  config_lib.check_range("--num_slices", FLAGS.num_slices, lo=1)
  config_lib.check_range("--per_chip_batch", FLAGS.per_chip_batch, lo=0,
                         note="0 = use train.batch_size")
  target = tpu_target(FLAGS.topology, FLAGS.num_slices)
  if FLAGS.per_chip_batch:
    config.train.batch_size = FLAGS.per_chip_batch * len(target.devices)
  print(f"{target.name}: {len(target.devices)} chips ({target.devices[0].device_kind}), "
        f"{target.hbm_bytes / GIB:.0f} GiB HBM each; global batch {config.train.batch_size} x "
        f"{config.data.seq_len} tokens; model dtype {config.model.dtype}", flush=True)
  results = plan(config, target, FLAGS.search)
  print(table(results, target.hbm_bytes))
  if FLAGS.search:
    best = rank(results, target.hbm_bytes)
    print("\nfits, best first:" if best else "\nnothing fits: lower the batch, or a bigger slice")
    for i, p in enumerate(best, 1):
      print(f"  {i}. mesh {_fmt_mesh(p.mesh)}, remat={p.remat}: {p.total_bytes / GIB:.2f} GiB, "
            f"{p.flops_per_chip / 1e12:.1f} TFLOP/step/chip{_speed(p)}")
  else:
    p = results[0]
    verdict = "fits" if p.total_bytes <= target.hbm_bytes else "does NOT fit"
    print(f"\n{verdict}: {p.total_bytes / GIB:.2f} GiB of {target.hbm_bytes / GIB:.0f} GiB per "
          f"chip (compiled in {p.compile_seconds:.0f}s){_speed(p)}")
    if config.train.quantization != "none" and target.generation is not None:
      print(f"train.quantization={config.train.quantization}: {p.int8_matmuls} matmuls on s8 "
            f"operands in the compiled step; peak used "
            f"{effective_peak(config, target.generation) / 1e12:.0f} TFLOP/s per chip")
    if p.prediction is not None:
      pred, t = p.prediction, p.traffic
      print(f"predicted step: compute {_seconds(pred.compute_seconds)}, HBM traffic "
            f"{t.hbm_bytes / 1e9:,.3g} GB -> {_seconds(pred.hbm_seconds)}, collectives "
            f"{(t.async_collective_bytes + t.sync_collective_bytes) / 1e9:,.3g} GB per chip -> "
            f"{_seconds(pred.async_collective_seconds)} overlappable + "
            f"{_seconds(pred.sync_collective_seconds)} exposed" +
            (f"; between slices {t.dcn_bytes / 1e9:,.3g} GB over DCN -> "
             f"{_seconds(pred.dcn_seconds)} overlappable" if t.dcn_bytes else "") +
            " (a roofline: an optimistic bound)")


if __name__ == "__main__":
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-16, v6e-64, v5p-128, v5e:4x4")
  flags.DEFINE_integer("per_chip_batch", 0, "sets train.batch_size = this x chips")
  flags.DEFINE_integer("num_slices", 1, "multislice: this many slices over DCN (mesh.data "
                       "must be a multiple)")
  flags.DEFINE_bool("search", False, "try mesh layouts x remat policies; rank those that fit")
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(main)
