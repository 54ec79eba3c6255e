"""Convert checkpoints between Hugging Face and llm.

  python -m llm.convert hf-to-llm --hf_dir=IN --workdir=OUT [--peft_dir=ADAPTER]
  python -m llm.convert llm-to-hf --workdir=IN --hf_dir=OUT [--peft]
  python -m llm.convert llm-to-gguf --workdir=IN --out=model.gguf [--type=f32|f16|q8_0]

hf-to-llm writes OUT/config.json, OUT/config.py (a config file for
`llm.train --config=OUT/config.py`, starting from the converted params),
OUT/params (an Orbax params checkpoint) and OUT/tokenizer.model when the HF
directory has one. `llm.generate --workdir=OUT` and `llm.evaluate` use OUT
directly. llm-to-hf writes config.json and safetensors that
`transformers.AutoModelForCausalLM.from_pretrained` loads (a LoRA run merged).

LoRA: `llm-to-hf --peft` writes a LoRA run's adapters as a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
loads onto the transformers base; `hf-to-llm --peft_dir=ADAPTER` folds a PEFT LoRA
adapter into the imported weights.

llm-to-gguf writes one GGUF file for llama.cpp (llm.convert.gguf_export).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import jax
from absl import app, flags

from llm import cli
from llm import config as config_lib
from llm import workdir as workdir_lib
from llm.convert import hf
from llm.convert.gguf_export import TYPES as GGUF_TYPES, llm_to_gguf
from llm.model import quant, require_lm_head
from llm.workdir import Workdir, load_params, load_tokenizer, save_params

COMMANDS = ("hf-to-llm", "llm-to-hf", "llm-to-gguf")

CONFIG_PY = '''"""Config of a model converted from {hf_dir}."""
from pathlib import Path

from llm.config import from_json


def get_config():
  return from_json((Path(__file__).parent / "config.json").read_text())
'''


def _removed_on_failure(path: Path):
  """A directory this command creates: removed again if the command fails, so a failed
  conversion leaves nothing behind (an existing directory is left as it was)."""
  existed = path.exists()

  @contextlib.contextmanager
  def guard():
    try:
      yield
    except BaseException:
      if not existed:
        shutil.rmtree(path, ignore_errors=True)
      raise

  return guard()


def read_hf_config(hf_dir: Path) -> dict:
  config_path = hf_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} does not exist")
  try:
    hf_cfg = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from None
  if not isinstance(hf_cfg, dict):
    raise ValueError(f"{config_path} holds a JSON {type(hf_cfg).__name__}, not an object")
  return hf_cfg


def hf_to_llm(hf_dir: str, workdir: str, peft_dir: str = "") -> None:
  hf_dir_path, wd = Path(hf_dir), Workdir(workdir)
  if wd.path.exists() and (not wd.path.is_dir() or any(wd.path.iterdir())):
    what = ("a training run" if wd.checkpoints.exists() or wd.metrics.exists() else
            "a file" if not wd.path.is_dir() else "a directory with files in it")
    raise ValueError(f"--workdir={str(wd.path)!r} is {what}; hf-to-llm writes a new workdir "
                     "(config.json, params/, the tokenizer) and overwrites nothing: give a new "
                     "or empty directory")
  hf_cfg = read_hf_config(hf_dir_path)
  cfg = config_lib.base_config()
  try:
    cfg.model.update(hf.model_updates_from_hf(hf_cfg))
  except KeyError as e:
    raise ValueError(f"{hf_dir_path / 'config.json'} has no {e.args[0]!r}, which a Llama or "
                     "Mistral config needs") from None
  cfg.data.seq_len = int(min(hf_cfg.get("max_position_embeddings", 2048), 2048))
  with _removed_on_failure(wd.path):
    _write_converted(hf_dir_path, wd, cfg, peft_dir)


def _write_converted(hf_dir_path: Path, wd: Workdir, cfg, peft_dir: str = "") -> None:
  out = wd.path
  out.mkdir(parents=True, exist_ok=True)
  copied = _copy_tokenizer(hf_dir_path, out)
  if copied:  # tokenizer.json (with its config and chat template) wins over tokenizer.model
    main = workdir_lib.HF_TOKENIZER if workdir_lib.HF_TOKENIZER in copied else workdir_lib.TOKENIZER
    cfg.data.tokenizer_path = str((out / main).absolute())
  cfg.train.init_params = str(wd.params.absolute())
  config_lib.validate(cfg)
  params = hf.hf_to_params(hf.SafetensorsReader(hf_dir_path), cfg.model)
  if peft_dir:
    params = hf.merge_peft(params, cfg.model, peft_dir)
  save_params(wd.params, params)
  wd.write_config(cfg)
  wd.config_py.write_text(CONFIG_PY.format(hf_dir=hf_dir_path.absolute()))
  print(f"wrote {out}: config.json, config.py, {workdir_lib.PARAMS}/"
        + "".join(f", {name}" for name in copied))


# A model directory's tokenizer files, copied both ways as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model")


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copyfile(src / name, dst / name)
      copied.append(name)
  return copied


def llm_to_hf(workdir: str, hf_dir: str, peft: bool = False) -> None:
  if peft:
    return _write_peft(workdir, Path(hf_dir))
  quant.require_float_weights(Workdir(workdir).read_config().model, workdir, "export")
  config, params = load_params(workdir)
  require_lm_head(config.model, "export to a Hugging Face causal LM")
  out = Path(hf_dir)
  tok_path = Workdir(workdir).tokenizer(config)
  with _removed_on_failure(out):
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = 1, 2
    copied = []
    if tok_path.is_file():
      tok = load_tokenizer(workdir, config)
      bos, eos = tok.bos_id, tok.eos_id
      if tok_path.name == workdir_lib.HF_TOKENIZER:
        copied = _copy_tokenizer(tok_path.parent, out)
      else:
        shutil.copyfile(tok_path, out / "tokenizer.model")
        copied = ["tokenizer.model"]
    hf_cfg = hf.hf_config_from_model(config.model, config.data.seq_len, bos, eos)
    hf.write_safetensors(hf.params_to_hf(jax.device_get(params), config.model), out)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  print(f"wrote {out}: config.json, safetensors" + "".join(f", {name}" for name in copied))
  if config.model.mtp_layers:
    print(f"note: the {config.model.mtp_layers} multi-token-prediction head(s) "
          "(model.mtp_layers) are training-only and not exported; transformers has no place "
          "for them")


def _write_peft(workdir: str, out: Path) -> None:
  config, params = load_params(workdir, merge_lora=False)
  if not config.model.lora.rank:
    raise ValueError(f"{workdir} is not a LoRA run (model.lora.rank=0): export it without "
                     "--peft")
  with _removed_on_failure(out):
    out.mkdir(parents=True, exist_ok=True)
    hf.write_safetensors(hf.adapters_to_peft(jax.device_get(params), config.model), out,
                         filename="adapter_model.safetensors")
    (out / "adapter_config.json").write_text(
        json.dumps(hf.peft_config(config.model, config.train.init_params), indent=2))
  print(f"wrote {out}: adapter_config.json, adapter_model.safetensors")


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command, one of {list(COMMANDS)}; got {argv[1:]}")
  if argv[1] == "llm-to-gguf":
    if not FLAGS.workdir or not FLAGS.out:
      raise app.UsageError("--workdir and --out are both required")
    return llm_to_gguf(FLAGS.workdir, FLAGS.out, FLAGS.type)
  if not FLAGS.hf_dir or not FLAGS.workdir:
    raise app.UsageError("--hf_dir and --workdir are both required")
  if argv[1] == "hf-to-llm":
    hf_to_llm(FLAGS.hf_dir, FLAGS.workdir, FLAGS.peft_dir)
  else:
    llm_to_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.peft)


if __name__ == "__main__":
  flags.DEFINE_string("hf_dir", None, "A Hugging Face model directory.")
  flags.DEFINE_string("workdir", None, "An llm workdir.")
  flags.DEFINE_string("peft_dir", "", "hf-to-llm: a PEFT LoRA adapter to fold into the weights.")
  flags.DEFINE_bool("peft", False, "llm-to-hf: write a LoRA run's adapters as a PEFT adapter.")
  flags.DEFINE_string("out", "", "llm-to-gguf: the GGUF file to write (a new one).")
  flags.DEFINE_enum("type", "f32", list(GGUF_TYPES), "llm-to-gguf: how matrices are stored.")
  cli.run(main)
