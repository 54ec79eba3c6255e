"""Training throughput: tokens/s, achieved GFLOP/s and MFU of the real train step, with
the peers a user would pick instead, in the same run.

  python benchmarks/train_throughput.py [--steps 20 --d_model 256 --n_layers 2 --vocab 32000
                                         --seq_len 256 --batch 4 --dtype float32 --remat none
                                         --loss_chunk 128 --peers materialised,torch,torch_compile
                                         --rounds 3 --attention xla --quantization none
                                         --separate_processes]

Systems, timed in interleaved rounds (medians over all timed steps):
  - ours: the train step as `llm.train` runs it (fused, chunked head + cross-entropy);
  - materialised: the same step with the loss computed from whole [B, T, V] logits by
    autodiff (how this project computed it before the fused loss);
  - torch / torch_compile: transformers' LlamaForCausalLM of the same shape, fp32, its
    own cross-entropy, torch.optim.AdamW (foreach), eager or with `torch.compile` on the
    forward + loss (torch threads = CPU cores). Needs the `test` extra (torch,
    transformers). On a CUDA GPU they run there, with bf16 autocast when --dtype is
    bfloat16 (fp32 parameters, as ours) and SDPA attention; skipped on a TPU.

MFU is against the best matmul throughput measured in the same run on the same device
(random operands, bf16 or fp32 as --dtype), and on a GPU or TPU also against the
datasheet peak. Prints a table and appends it, with the exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_result, machine  # noqa: E402
from llm.config import base_config, validate  # noqa: E402
from llm.flops import flops_per_token  # noqa: E402
from llm.hardware import datasheet_peak_flops, measure_matmul_flops  # noqa: E402
from llm.model import forward, make_model  # noqa: E402
from llm.ops.cross_entropy import token_nll  # noqa: E402
from llm.model.layers import DTYPES  # noqa: E402
from llm.model.transformer import REMAT_POLICIES  # noqa: E402
from llm.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS  # noqa: E402
from llm.parallel.mesh import make_mesh, use_mesh  # noqa: E402
from llm.parallel.rules import batch_sharding as make_batch_sharding  # noqa: E402
from llm.training.optim import make_optimizer, schedule  # noqa: E402
from llm.training.state import init_state, state_shardings  # noqa: E402
from llm.objectives import loss_fn  # noqa: E402
from llm.objectives.base import ROW_FIELDS  # noqa: E402
from llm.training.step import jit_train_step, train_step  # noqa: E402
from llm.model.quant import TRAINING_QUANT, for_training  # noqa: E402


PEERS = ("materialised", "torch", "torch_compile")


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20, help="timed steps per system and round")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--n_layers", type=int, default=2)
  p.add_argument("--n_heads", type=int, default=4)
  p.add_argument("--n_kv_heads", type=int, default=None, help="default: n_heads")
  p.add_argument("--d_ff", type=int, default=768)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--dtype", default="float32", choices=list(DTYPES))
  p.add_argument("--remat", default="none", choices=list(REMAT_POLICIES))
  p.add_argument("--attention", default="xla", choices=list(ATTENTION_IMPLEMENTATIONS))
  p.add_argument("--loss_chunk", type=int, default=None,
                 help="train.loss_chunk (default: the config's)")
  p.add_argument("--peers", default=",".join(PEERS),
                 help=f"comma-separated, any of {', '.join(PEERS)} ('' = none)")
  p.add_argument("--quantization", default="none", choices=list(TRAINING_QUANT),
                 help="train.quantization of our step (qwix int8 / fp8 matmuls)")
  p.add_argument("--separate_processes", action="store_true",
                 help="time the torch peers first, each in its own process, so that neither "
                      "framework is held to a share of the accelerator's memory")
  p.add_argument("--peer_only", default=None, help=argparse.SUPPRESS)  # the child's side
  p.add_argument("--no_append", action="store_true", help="do not append to BENCHMARKS.md")
  args = p.parse_args()
  args.peers = [x for x in args.peers.split(",") if x]
  args.n_kv_heads = args.n_kv_heads or args.n_heads
  for peer in args.peers:
    if peer not in PEERS:
      p.error(f"--peers: {peer!r} is not one of {', '.join(PEERS)}")
  return args


def materialised_objective(params, batch, *, model, config, rng=None):
  """next_token's loss from whole [B, T, V] fp32 logits, differentiated by autodiff."""
  logits_BTV, _ = forward(model, params, batch, rng)
  nll_BT, logz_BT = token_nll(logits_BTV, batch["targets"])
  mask_BT = batch["loss_mask"]
  nll, z = jnp.sum(nll_BT * mask_BT), jnp.sum(jnp.square(logz_BT) * mask_BT)
  return nll + config.train.z_loss * z, {"loss": nll, "z_loss": z, "weight": jnp.sum(mask_BT)}


def jax_system(cfg, args, objective=None):
  """(step(), compile seconds, memory analysis) of our train step on one device."""
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  model = for_training(make_model(cfg.model), cfg.train.quantization)
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  _, shardings = state_shardings(model, tx, args.seq_len, mesh)
  state = init_state(model, tx, args.seq_len, 0, shardings)
  batch_sharding = make_batch_sharding(mesh)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq_len)
  batch = {"inputs": rng.integers(0, args.vocab, shape), "targets": rng.integers(0, args.vocab, shape),
           "segment_ids": np.ones(shape), "positions": np.broadcast_to(np.arange(args.seq_len), shape),
           "loss_mask": np.ones(shape)}
  batch = {k: jax.device_put(np.asarray(batch[k], np.float32 if k == "loss_mask" else np.int32),
                             batch_sharding) for k in ROW_FIELDS}
  if objective is None:
    step_fn = jit_train_step(cfg, loss_fn(cfg, model), tx, shardings, batch_sharding)
  else:
    step_fn = jax.jit(functools.partial(
        train_step, objective=functools.partial(objective, model=model, config=cfg), tx=tx,
        lr_schedule=schedule(cfg.optim, cfg.train.steps), grad_accum=1), donate_argnums=0)
  t0 = time.perf_counter()
  with use_mesh(mesh):
    compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  return step, compile_s, compiled.memory_analysis()


def torch_system(args, compiled: bool, device: str):
  """step() of transformers' Llama of the same shape with torch.optim.AdamW."""
  import contextlib
  import os

  import torch
  import transformers
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  hf = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
      num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.seq_len,
      tie_word_embeddings=False, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf).float().train().to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
  ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
  autocast = (torch.autocast(device, torch.bfloat16) if args.dtype == "bfloat16"
              else contextlib.nullcontext())

  def loss_fn(ids):
    with autocast:
      return model(input_ids=ids, labels=ids).loss

  fn = torch.compile(loss_fn) if compiled else loss_fn

  def step():
    opt.zero_grad(set_to_none=True)
    loss = fn(ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  t0 = time.perf_counter()
  step()
  return step, time.perf_counter() - t0


def timed(step, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` timed steps after `warmup` untimed ones."""
  for _ in range(warmup):
    step()
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    out.append(time.perf_counter() - t0)
  return out


def peer_in_own_process(peer: str) -> tuple[float, float]:
  """(median step seconds, first-step seconds) of a torch peer run by this script in a
  process of its own (before this one touches the accelerator)."""
  import json
  import subprocess
  run = subprocess.run([sys.executable, __file__, *sys.argv[1:], f"--peer_only={peer}"],
                       capture_output=True, text=True)
  if run.returncode:
    raise RuntimeError(f"the {peer} peer's process failed:\n{run.stderr[-3000:]}")
  result = json.loads(run.stdout.strip().splitlines()[-1])
  return result["step_s"], result["compile_s"]


def main():
  args = parse()
  if args.peer_only:  # the child: one torch peer, its timings as a JSON line
    import json

    import torch
    step, first = torch_system(args, compiled=args.peer_only == "torch_compile",
                               device="cuda" if torch.cuda.is_available() else "cpu")
    times = [t for _ in range(args.rounds) for t in timed(step, args.warmup, args.steps)]
    print(json.dumps({"step_s": float(np.median(times)), "compile_s": first}))
    return
  separate = {}
  if args.separate_processes:
    for peer in [p for p in args.peers if p != "materialised"]:
      separate[peer] = peer_in_own_process(peer)
  cfg = base_config()
  cfg.model.update(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                   n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_ff=args.d_ff,
                   dtype=args.dtype, remat=args.remat, attention=args.attention)
  cfg.data.seq_len = args.seq_len
  cfg.train.update(batch_size=args.batch, steps=(args.steps + args.warmup) * args.rounds + 1)
  if args.loss_chunk is not None:
    cfg.train.loss_chunk = args.loss_chunk
  cfg.train.quantization = args.quantization
  cfg.optim.warmup_steps = 1
  cfg.mesh.update(data=-1)
  validate(cfg)
  platform_name = jax.devices()[0].platform

  systems, compile_s, memory = {}, {}, {}
  systems["ours"], compile_s["ours"], memory["ours"] = jax_system(cfg, args)
  for peer in args.peers:
    if peer == "materialised":
      systems[peer], compile_s[peer], memory[peer] = jax_system(cfg, args, materialised_objective)
    elif peer in separate:
      continue
    elif platform_name == "tpu":
      print(f"skipping {peer}: the torch peers run on a CPU or a CUDA GPU")
    else:
      systems[peer], compile_s[peer] = torch_system(
          args, compiled=peer == "torch_compile", device="cpu" if platform_name == "cpu" else "cuda")

  times = {name: [] for name in systems}
  for _ in range(args.rounds):  # interleaved: one round of each system in turn
    for name, step in systems.items():
      times[name] += timed(step, args.warmup, args.steps)
  step_s = {name: float(np.median(t)) for name, t in times.items()}
  for peer, (seconds, first) in separate.items():
    step_s[peer], compile_s[peer] = seconds, first

  tokens = args.batch * args.seq_len
  flops = flops_per_token(cfg.model, args.seq_len) * tokens
  peak = measure_matmul_flops(n=2048 if platform_name == "cpu" else 8192, dtype=jnp.dtype(args.dtype))
  datasheet = None if platform_name == "cpu" else datasheet_peak_flops(jax.devices()[0].device_kind)
  quantized = "" if args.quantization == "none" else f", {args.quantization} matmuls"
  labels = {"ours": f"this project ({args.attention} attention, loss_chunk "
                    f"{cfg.train.loss_chunk}{quantized})",
            "materialised": "this project, whole logits (autodiff loss)",
            "torch": "PyTorch + transformers, eager",
            "torch_compile": "PyTorch + transformers, torch.compile(forward + loss)"}
  sheet_col = f" MFU ({datasheet[1]} datasheet) |" if datasheet else ""
  lines = [f"| system | ms/step (median) | tokens/s | MFU (in-run matmul) |{sheet_col} "
           "ours / system (speed) | compile s | temporaries MiB |",
           "|---|--:|--:|--:|" + ("--:|" if datasheet else "") + "--:|--:|--:|"]
  for name, s in step_s.items():
    temp = f"{memory[name].temp_size_in_bytes / 2**20:.1f}" if name in memory else ""
    sheet = f" {100 * flops / s / datasheet[0]:.1f}% |" if datasheet else ""
    lines.append(f"| {labels[name]} | {s * 1e3:.1f} | {tokens / s:,.0f} | "
                 f"{100 * flops / s / peak:.1f}% |{sheet} {s / step_s['ours']:.2f}x | "
                 f"{compile_s[name]:.1f} | {temp} |")
  table = "\n".join(lines)
  notes = (f"Model GFLOP/step {flops / 1e9:.2f} (6 N per token + attention); in-run matmul peak "
           f"{peak / 1e9:.1f} GFLOP/s; {args.rounds} interleaved rounds of {args.steps} timed "
           f"steps after {args.warmup} untimed. 'ours / system' above 1 means ours is faster.")
  if separate:
    notes += (f" {', '.join(separate)} ran first, each in a process of its own, so no "
              "framework was held to a share of the memory.")
  print(table)
  print(notes)
  if not args.no_append:
    append_result("train_throughput", f"{machine()}; d_model {args.d_model}, {args.n_layers} "
                  f"layers, {args.n_heads} heads ({args.n_kv_heads} KV), d_ff {args.d_ff}, vocab "
                  f"{args.vocab}, seq {args.seq_len}, batch {args.batch}, {args.dtype}, remat "
                  f"{args.remat}", table + "\n\n" + notes)


if __name__ == "__main__":
  main()
