"""Per-chip memory of a model's train step on a TPU slice, by per-chip batch and remat
policy, from ahead-of-time compiles (llm.plan; needs libtpu: pip install -e ".[tpu]").

  JAX_PLATFORMS=cpu python benchmarks/plan_memory.py [--config configs/llama2_7b.py
      --topology v5e-16 --seq_len 2048 --batches 1,2,4,8 --remat none,dots,dots_no_batch,full,offload]

Mesh: fsdp over every chip; compute bf16, params and Adam state fp32. Prints a table,
the largest per-chip batch that fits per remat policy, and appends both, with the
command, to BENCHMARKS.md.

`--finetune full,lora,qlora-int8,qlora-nf4` compares fine-tuning modes instead: full
(fp32 params + AdamW), LoRA rank `--lora_rank` on every projection over a bf16 base,
and QLoRA over an int8 / NF4 base (adapters and their Adam state fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.plan import GIB, compile_step, failure, table, tpu_target  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "llama2_7b.py"))
  p.add_argument("--topology", default="v5e-16")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batches", default="1,2,4,8")
  p.add_argument("--remat", default="none,dots,dots_no_batch,full,offload")
  p.add_argument("--attention", default="xla", help="xla | flash (the Pallas TPU kernel)")
  p.add_argument("--finetune", default="", help="e.g. full,lora,qlora-int8,qlora-nf4")
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--chips", type=int, default=0,
                 help="use the first N chips of the topology (libtpu describes no v5e-1: "
                      "--topology v5e-4 --chips 1 is one v5e chip)")
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  if args.finetune:
    return finetune(args)
  target = tpu_target(args.topology)
  n = len(target.devices)
  results, largest = [], {}
  for remat in args.remat.split(","):
    for b in [int(x) for x in args.batches.split(",")]:
      c = load_config(args.config, check=False)
      c.data.seq_len = args.seq_len
      c.model.update(remat=remat, dtype="bfloat16", param_dtype="float32",
                     attention=args.attention)
      c.mesh.update(data=1, fsdp=n, tensor=1, sequence=1)
      c.train.batch_size = b * n
      try:
        plan = compile_step(c, target)
      except Exception as err:  # noqa: BLE001 (the compiler may refuse outright)
        results.append(failure(dict(c.mesh), remat, b * n, err))
        print(f"remat={remat} batch/chip={b}: {type(err).__name__}", flush=True)
        continue
      results.append(plan)
      if plan.total_bytes <= target.hbm_bytes:
        largest[remat] = max(largest.get(remat, 0), b)
      print(f"remat={remat} batch/chip={b}: {plan.total_bytes / GIB:.2f} GiB"
            f"{' (compiler: out of HBM)' if plan.compiler_oom else ''} "
            f"(compiled in {plan.compile_seconds:.0f}s)", flush=True)
  out = table(results, target.hbm_bytes)
  summary = ["| remat | largest per-chip batch that fits |", "|-------|------:|"]
  summary += [f"| {r} | {largest.get(r, 'none of ' + args.batches)} |"
              for r in args.remat.split(",")]
  print(out + "\n\n" + "\n".join(summary))
  if not args.no_append:
    description = (f"AOT compile for {args.topology} ({n} x {target.devices[0].device_kind}, "
                   f"{target.hbm_bytes / GIB:.0f} GiB HBM) with libtpu, jax {jax.__version__}; "
                   f"{Path(args.config).name}, seq {args.seq_len}, attention {args.attention}, "
                   f"fsdp={n}, bf16 compute, fp32 params + AdamW state. total = arguments + "
                   "non-aliased outputs + temporaries + code, per chip.")
    append_result("plan memory", description, out + "\n\n" + "\n".join(summary),
                  env_prefix="JAX_PLATFORMS=cpu ")


def _finetune_config(args, mode: str, n: int, batch: int):
  c = load_config(args.config, check=False)
  c.data.seq_len = args.seq_len
  c.model.update(remat=args.remat.split(",")[0], dtype="bfloat16", attention=args.attention,
                 param_dtype="float32" if mode == "full" else "bfloat16")
  if mode != "full":
    c.model.lora.update(rank=args.lora_rank, targets="q,k,v,o,gate,up,down",
                        base_quant=mode.split("-")[1] if mode.startswith("qlora") else "none")
  c.mesh.update(data=1, fsdp=n, tensor=1, sequence=1)
  c.train.batch_size = batch * n
  return c


def finetune(args):
  target = tpu_target(args.topology)
  if args.chips:
    target = dataclasses.replace(target, devices=target.devices[:args.chips])
  n = len(target.devices)
  rows = ["| mode | per-chip batch | params + optimizer state (GiB) | temporaries (GiB) | "
          "total per chip (GiB) | fits |", "|---|--:|--:|--:|--:|---|"]
  for mode in args.finetune.split(","):
    for b in [int(x) for x in args.batches.split(",")]:
      try:
        plan = compile_step(_finetune_config(args, mode, n, b), target)
      except Exception as err:  # noqa: BLE001
        rows.append(f"| {mode} | {b} | - | - | - | {type(err).__name__} |")
        continue
      fits = "yes" if plan.total_bytes <= target.hbm_bytes and not plan.compiler_oom else "no"
      rows.append(f"| {mode} | {b} | {plan.argument_bytes / GIB:.2f} | "
                  f"{plan.temp_bytes / GIB:.2f} | {plan.total_bytes / GIB:.2f} | {fits} |")
      print(rows[-1], flush=True)
  out = "\n".join(rows)
  print(out)
  if not args.no_append:
    where = f"{n} chip(s) of {args.topology}" if args.chips else args.topology
    description = (f"Fine-tuning memory, AOT compile for {where} ({n} x "
                   f"{target.devices[0].device_kind}, {target.hbm_bytes / GIB:.0f} GiB HBM) with "
                   f"libtpu, jax {jax.__version__}; {Path(args.config).name}, seq {args.seq_len}, "
                   f"remat {args.remat.split(',')[0]}, fsdp={n}, bf16 compute. full: fp32 params "
                   f"+ AdamW; lora: rank {args.lora_rank} on q,k,v,o,gate,up,down over a bf16 "
                   "base; qlora-int8/nf4: the base stored int8 / NF4; adapters and their AdamW "
                   "state fp32.")
    append_result("fine-tuning memory", description, out, env_prefix="JAX_PLATFORMS=cpu ")


if __name__ == "__main__":
  main()
