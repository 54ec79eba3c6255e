"""Weight-only quantization of a trained or converted model into a servable workdir:

  python -m llm.quantize --workdir=runs/tiny --out=runs/tiny-int4 --weights=int4

Every projection kernel (attention q/k/v/o, the MLP's gate/up/down) is stored int8 (per
output channel) or int4 (groups of 128 inputs, qwix's rounding); embeddings, norms, the
unembedding and routed MoE experts stay as they are (llm/model/quant.py). A LoRA run is
merged first. The new workdir has model.weight_quant set: it serves (python -m
llm.serve, Engine), generates (llm.generate, the Decoder) and evaluates (llm.evaluate),
dequantizing each kernel in its matmul; it does not train. `--out` must be new: it is
written beside itself and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from absl import flags

from llm import cli
from llm.model.quant import WEIGHT_QUANT
from llm.workdir import Workdir, load_params, save_params

FLAGS = flags.FLAGS


def quantize_workdir(workdir: str, out: str, weights: str) -> Path:
  """Writes the `weights`-quantized copy of `workdir` to the new directory `out`."""
  import jax

  from llm.convert.__main__ import TOKENIZER_FILES
  from llm.model import quant
  kinds = [k for k in WEIGHT_QUANT if k != "none"]
  if weights not in kinds:
    raise ValueError(f"--weights={weights!r}; allowed: {', '.join(kinds)}")
  out_path = Path(out)
  if out_path.exists():
    raise ValueError(f"--out={out!r} exists; llm.quantize writes a new directory and "
                     "overwrites nothing")
  src = Workdir(workdir)
  config = src.read_config()
  if config.model.weight_quant != "none":
    raise ValueError(f"{workdir!r} is already quantized (model.weight_quant="
                     f"{config.model.weight_quant!r}); quantize its float original")
  config, params = load_params(workdir)  # (a LoRA run: merged)
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  params = jax.jit(quant.quantize_base, static_argnums=1)(params, weights)
  quant_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  config.model.weight_quant = weights
  partial = out_path.with_name(f".{out_path.name}.partial")
  if partial.exists():
    shutil.rmtree(partial)  # our own leftover from an interrupted run
  dst = Workdir(partial)
  partial.mkdir(parents=True)
  tok = src.tokenizer(config)
  if tok.is_file() and not config.data.tokenizer_path:  # the workdir's own: copied
    for name in TOKENIZER_FILES:  # (with an HF tokenizer's companions)
      if (tok.parent / name).is_file():
        shutil.copyfile(tok.parent / name, partial / name)
  config.train.init_params = str((out_path / dst.params.name).absolute())
  save_params(dst.params, params)
  dst.write_config(config)
  os.replace(partial, out_path)
  print(f"wrote {out_path}: {weights} projection kernels; params {float_bytes / 2**20:.2f} MiB "
        f"-> {quant_bytes / 2**20:.2f} MiB")
  return out_path


def main(argv):
  del argv
  quantize_workdir(FLAGS.workdir, FLAGS.out, FLAGS.weights)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training or converted workdir (float weights).")
  flags.DEFINE_string("out", None, "The new, quantized workdir.")
  flags.DEFINE_string("weights", "int8", "int8 (per channel) | int4 (groups of 128).")
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)
