"""Model merging with mergekit's configuration and semantics.

  python -m llm.merge --config=merge.yaml --out=DIR [--hf_out=HF_DIR] [--seed=0]

merge.yaml has mergekit's shape:

  merge_method: ties        # linear | slerp | task_arithmetic | ties | dare_linear | dare_ties
  base_model: runs/base     # a workdir or a Hugging Face directory (not for linear)
  models:
    - model: runs/math
      parameters: {weight: 0.5, density: 0.5}
    - model: runs/code
      parameters:
        weight: [0.2, 0.8]  # a gradient over the layers
        density:
          - {filter: self_attn, value: 0.3}   # the first matching filter wins
          - {value: 0.6}
  parameters: {normalize: true, lambda: 1.0}
  dtype: float32            # float32 | bfloat16 | float16: the merged tensors' dtype

Inputs are workdirs (a LoRA run merged into its base) or HF directories of one
architecture; they are merged tensor by tensor under their Hugging Face names, so
parameter filters match the names mergekit matches ("self_attn", "mlp.down_proj",
"embed_tokens", ...) and a gradient (a list of values) is read at t = layer / (layers -
1), t = 0 for tensors outside the layers. A model's own `parameters` take precedence over
the top-level ones. The methods (METHODS):
  - linear: sum_i w_i x_i, divided by sum_i w_i when `normalize` (default true);
  - slerp: spherical interpolation from base_model (t = 0) to the one other model (t = 1)
    over each whole tensor, linear where the two are nearly parallel;
  - task_arithmetic: base + lambda x sum_i w_i (x_i - base) (`normalize`: / sum_i w_i);
  - ties: each task vector x_i - base keeps its largest-magnitude `density` fraction, then
    per entry only those agreeing with the sign of the weighted sum are averaged
    (weighted; `normalize` default true);
  - dare_linear / dare_ties: each task vector keeps a random `density` fraction, rescaled
    to its L1 norm (`rescale`, default true), then summed (dare_linear) or sign-elected
    (dare_ties). The draws depend on --seed, the tensor's name and the model.
DIR is a workdir (config, params, the tokenizer of the base model, else the first, and the
chat template and seq_len of the first listed model that is a workdir);
--hf_out also writes a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from absl import flags

from llm import cli
from llm import config as config_lib
from llm.convert import hf
from llm.convert.__main__ import TOKENIZER_FILES, hf_to_llm, read_hf_config
from llm.model import require_lm_head
from llm.workdir import Workdir, load_params, load_tokenizer

# merge_method -> (needs base_model, sparsification, sign consensus, normalize default,
# rescale default); linear and slerp have their own shapes
METHODS = {
    "linear": None,
    "slerp": None,
    "task_arithmetic": (True, None, False, False, False),
    "ties": (True, "magnitude", True, True, False),
    "dare_linear": (True, "random", False, False, True),
    "dare_ties": (True, "random", True, False, True),
}
# parameter name -> (where it may be given: "model" per input, "shared" for the merge)
PARAMETERS = {
    "linear": {"weight": "model", "normalize": "shared"},
    "slerp": {"t": "shared"},
    "task_arithmetic": {"weight": "model", "normalize": "shared", "lambda": "shared"},
    "ties": {"weight": "model", "density": "model", "normalize": "shared",
             "lambda": "shared", "int8_mask": "shared", "rescale": "shared"},
}
for _name in ("dare_linear", "dare_ties"):
  PARAMETERS[_name] = PARAMETERS["ties"]
DTYPES = ("float32", "bfloat16", "float16")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# ------------------------------------------------------------------ the configuration


@dataclasses.dataclass
class MergeInput:
  path: Path
  parameters: dict


@dataclasses.dataclass
class MergeConfig:
  method: str
  models: list[MergeInput]
  base: Path | None
  parameters: dict
  dtype: str

  @property
  def others(self) -> list[MergeInput]:
    """The inputs merged into the base (all of them for linear)."""
    return [m for m in self.models if self.base is None or m.path != self.base]


def _check_setting(where: str, value) -> None:
  """A parameter value: a number or bool, a list of numbers (a gradient over the
  layers), or a list of {filter, value} conditions."""
  if isinstance(value, (bool, int, float)):
    return
  if isinstance(value, list) and value and all(isinstance(v, (int, float)) and
                                                not isinstance(v, bool) for v in value):
    return
  if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
    for cond in value:
      if set(cond) - {"filter", "value"} or "value" not in cond:
        raise ValueError(f"{where}: a condition is {{filter: NAME, value: V}}, got {cond!r}")
      _check_setting(where, cond["value"])
    return
  raise ValueError(f"{where}={value!r}: give a number, a list of numbers (a gradient over "
                   "the layers) or a list of {filter, value} conditions")


def parse_config(text: str) -> MergeConfig:
  """A mergekit-shaped YAML merge configuration, checked (relative paths are read from
  the working directory, as mergekit reads them)."""
  try:
    import yaml
  except ImportError:
    raise ValueError("llm.merge reads YAML with PyYAML: pip install -e '.[merge]'") from None
  try:
    raw = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ValueError(f"the merge config is not valid YAML: {str(e).splitlines()[0]}") from None
  if not isinstance(raw, dict):
    raise ValueError("the merge config is a YAML mapping with merge_method and models")
  unknown = set(raw) - {"merge_method", "base_model", "models", "parameters", "dtype",
                        "out_dtype", "tokenizer_source"}
  if unknown & {"slices", "modules"}:
    raise ValueError(f"{sorted(unknown & {'slices', 'modules'})} are not supported: merge "
                     "whole models with `models:`")
  if unknown:
    raise ValueError(f"unknown keys {sorted(unknown)}; allowed: merge_method, base_model, "
                     "models, parameters, dtype")
  method = raw.get("merge_method")
  if method not in METHODS:
    raise ValueError(f"merge_method={method!r}; allowed: {list(METHODS)}")
  resolve = lambda p: Path(str(p)).resolve()  # noqa: E731
  models = []
  for i, entry in enumerate(raw.get("models") or []):
    if not isinstance(entry, dict) or "model" not in entry:
      raise ValueError(f"models[{i}] is {{model: PATH, parameters: {{...}}}}, got {entry!r}")
    models.append(MergeInput(resolve(entry["model"]), dict(entry.get("parameters") or {})))
  base = resolve(raw["base_model"]) if raw.get("base_model") else None
  if base is not None and all(m.path != base for m in models):
    models.insert(0, MergeInput(base, {}))
  allowed = PARAMETERS[method]
  shared = dict(raw.get("parameters") or {})
  for name, value in shared.items():
    if name not in allowed:
      raise ValueError(f"parameters.{name}: {method} takes {sorted(allowed)}")
    _check_setting(f"parameters.{name}", value)
  for m in models:
    for name, value in m.parameters.items():
      if allowed.get(name) != "model":
        raise ValueError(f"{m.path}: parameters.{name} is not a per-model parameter of "
                         f"{method} (per model: "
                         f"{sorted(k for k, v in allowed.items() if v == 'model')})")
      _check_setting(f"{m.path}: parameters.{name}", value)
  dtype = raw.get("out_dtype") or raw.get("dtype") or "float32"
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {list(DTYPES)}")
  config = MergeConfig(method, models, base, shared, dtype)
  needs_base = method == "slerp" or (METHODS[method] or (False,))[0]
  if needs_base and base is None:
    raise ValueError(f"merge_method={method!r} needs base_model")
  if method == "slerp" and len(config.others) != 1:
    raise ValueError(f"slerp interpolates base_model and one other model; got "
                     f"{len(config.others)} others")
  if not config.others:
    raise ValueError("models: nothing to merge (list at least one model besides the base)")
  for m in config.others:
    if "weight" in allowed and "weight" not in m.parameters and "weight" not in shared:
      raise ValueError(f"{m.path}: {method} needs a weight (parameters: {{weight: W}})")
  if method == "slerp" and "t" not in shared:
    raise ValueError("slerp needs parameters.t (0: base_model, 1: the other model)")
  return config


def evaluate_setting(setting, tensor_name: str, t: float):
  """mergekit's reading of a parameter for one tensor: the first matching condition (a
  filter is a substring of the tensor's name; none or "*" matches all), a gradient read
  at t (linear between its points), or the value itself; None when no condition matches."""
  if isinstance(setting, dict):
    setting = [setting]
  if isinstance(setting, list) and setting and isinstance(setting[0], dict):
    for cond in setting:
      f = cond.get("filter")
      if f is None or f == "*" or f in tensor_name:
        return evaluate_setting(cond["value"], tensor_name, t)
    return None
  if isinstance(setting, list):
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
  return setting


def _parameter(name: str, scopes: list[dict], tensor_name: str, t: float, default=None):
  for scope in scopes:
    if name in scope:
      value = evaluate_setting(scope[name], tensor_name, t)
      if value is not None:
        return value
  return default


# ------------------------------------------------------------------ the methods


def slerp(t: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> np.ndarray:
  """Spherical interpolation of two whole tensors (as vectors), in float32: linear where
  their directions' cosine exceeds `dot_threshold` in magnitude."""
  a, b = v0.astype(np.float32).ravel(), v1.astype(np.float32).ravel()
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
  dot = float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
  if abs(dot) > dot_threshold:
    ca, cb = 1.0 - t, t
  else:
    theta = np.arccos(dot)
    ca, cb = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
  return (np.float32(ca) * a + np.float32(cb) * b).reshape(v0.shape)


def magnitude_mask(delta: np.ndarray, density: float) -> np.ndarray:
  """Keeps the largest-magnitude `density` fraction of entries (at least one)."""
  if density >= 1:
    return np.ones(delta.shape, np.float32)
  if density <= 0 or delta.size == 0:
    return np.zeros(delta.shape, np.float32)
  k = max(1, int(density * delta.size))
  mask = np.zeros(delta.size, np.float32)
  mask[np.argsort(-np.abs(delta).ravel(), kind="stable")[:k]] = 1.0
  return mask.reshape(delta.shape)


def random_mask(seed: int, tensor_name: str, model_index: int, shape,
                density: float) -> np.ndarray:
  """DARE's keep mask: each entry kept with probability `density`, drawn from (seed, the
  tensor's name, the input's index)."""
  rng = np.random.default_rng([seed, zlib.crc32(tensor_name.encode()), model_index])
  return (rng.random(shape) < density).astype(np.float32)


def _l1_rescaled(delta, mask, eps: float = 1e-7):
  masked = delta * mask
  before, after = np.abs(delta).sum(), np.abs(masked).sum()
  return masked if before < eps or after < eps else masked * (before / after)


def merge_tensor(config: MergeConfig, name: str, t: float, tensors: dict[Path, np.ndarray],
                 mask_fn: Callable) -> np.ndarray:
  """One merged tensor from the inputs' tensors of that name."""
  shared = [config.parameters]
  if config.method == "slerp":
    other = config.others[0]
    return slerp(float(_parameter("t", shared, name, t)), tensors[config.base],
                 tensors[other.path])
  if config.method == "linear":
    weights = [float(_parameter("weight", [m.parameters, *shared], name, t)) for m in
               config.models]
    out = sum(np.float32(w) * tensors[m.path].astype(np.float32)
              for w, m in zip(weights, config.models))
    if _parameter("normalize", shared, name, t, True):
      out = out / np.float32(sum(weights))
    return out
  _, sparsification, consensus, normalize, rescale = METHODS[config.method]
  base = tensors[config.base].astype(np.float32)
  rescale = _parameter("rescale", shared, name, t, rescale)
  deltas, weights = [], []
  for index, m in enumerate(config.models):
    if m.path == config.base:
      continue
    delta = tensors[m.path].astype(np.float32) - base
    density = float(_parameter("density", [m.parameters, *shared], name, t, 1.0))
    if sparsification == "magnitude":
      delta = delta * magnitude_mask(delta, density)
    elif sparsification == "random" and density < 1:
      mask = mask_fn(name, index, delta, density)
      delta = _l1_rescaled(delta, mask) if rescale else delta * mask
    deltas.append(delta)
    weights.append(float(_parameter("weight", [m.parameters, *shared], name, t)))
  w = np.asarray(weights, np.float32).reshape(-1, *([1] * base.ndim))
  deltas = np.stack(deltas) * w
  if consensus:  # TIES' sign election by the weighted sum
    majority = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0).astype(np.float32)
    agree = (np.sign(deltas) == majority).astype(np.float32)
    mixed = (deltas * agree).sum(axis=0)
    divisor = (w * agree).sum(axis=0)
    divisor[divisor == 0] = 1.0
  else:
    mixed = deltas.sum(axis=0)
    divisor = w.sum(axis=0) * np.ones_like(base)
    divisor[np.abs(divisor) < 1e-8] = 1.0
  if _parameter("normalize", shared, name, t, normalize):
    mixed = mixed / divisor
  lam = float(_parameter("lambda", shared, name, t, 1.0))
  if lam != 1:
    mixed = mixed * np.float32(lam)
  return base + mixed


# ------------------------------------------------------------------ the models


@dataclasses.dataclass
class Model:
  """One input: its llm model config and its tensors under their HF names (read lazily
  from safetensors, or exported from a workdir's params)."""
  path: Path
  model_cfg: Any
  get: Callable[[str], np.ndarray]
  names: list[str]
  hf_config: dict
  tokenizer_files: dict[str, Path]  # name in an HF directory -> the file
  data_cfg: Any = None  # a workdir's data settings (its chat template, seq_len)


def open_model(path: Path) -> Model:
  if not path.is_dir():
    raise ValueError(f"{path} is not a directory (a workdir or a Hugging Face directory)")
  wd = Workdir(path)
  if wd.params.exists() or wd.checkpoints.exists():
    config, params = load_params(path)
    require_lm_head(config.model, "merging")
    tensors = dict(hf.params_to_hf(jax.device_get(params), config.model))
    tok = wd.tokenizer(config)
    files, bos, eos = {}, 1, 2
    if tok.is_file():  # tokenizer.json with its companions, or a sentencepiece model
      files = ({n: tok.parent / n for n in TOKENIZER_FILES if (tok.parent / n).is_file()}
               if tok.name == "tokenizer.json" else {"tokenizer.model": tok})
      loaded = load_tokenizer(path, config)
      bos, eos = loaded.bos_id, loaded.eos_id
    return Model(path, config.model, tensors.__getitem__, list(tensors),
                 hf.hf_config_from_model(config.model, config.data.seq_len, bos, eos), files,
                 config.data)
  if not list(path.glob("*.safetensors")):
    raise ValueError(f"{path} is neither a workdir (no params or checkpoints) nor a Hugging "
                     "Face directory (no *.safetensors)")
  hf_cfg = read_hf_config(path)
  cfg = config_lib.base_config()
  cfg.model.update(hf.model_updates_from_hf(hf_cfg))
  reader = hf.SafetensorsReader(path)
  names = hf.hf_names(cfg.model)
  return Model(path, cfg.model, reader.get, names, hf_cfg,
               {n: path / n for n in TOKENIZER_FILES if (path / n).is_file()})


_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "mlp", "head", "tie_embeddings")


def check_same_architecture(models: list[Model]) -> None:
  first = models[0]
  for m in models[1:]:
    for f in _ARCH_FIELDS:
      a, b = first.model_cfg.get(f), m.model_cfg.get(f)
      if a != b:
        raise ValueError(f"{m.path} has model.{f}={b!r}, {first.path} has {a!r}: merging needs "
                         "one architecture")


def merge(config: MergeConfig, out: Path, hf_out: Path | None = None, seed: int = 0,
          mask_fn: Callable | None = None) -> Path:
  """Merges per `config` into the workdir `out` (and the HF directory `hf_out`)."""
  for target in (out, hf_out):
    if target is not None and target.exists() and any(target.iterdir()):
      raise ValueError(f"{target} exists and is not empty; the merge writes a new directory "
                       "and overwrites nothing")
  models = [open_model(m.path) for m in config.models]
  check_same_architecture(models)
  by_path = {m.path: m for m in models}
  n_layers = models[0].model_cfg.n_layers
  mask_fn = mask_fn or (lambda name, index, delta, density: random_mask(
      seed, name, index, delta.shape, density))
  first = by_path[config.base] if config.base is not None else models[0]

  def merged():
    for i, name in enumerate(first.names):
      layer = _LAYER.search(f".{name}")
      t = int(layer.group(1)) / (n_layers - 1) if layer and n_layers > 1 else (
          1.0 if layer else 0.0)
      tensors = {m.path: m.get(name) for m in models}
      shapes = {p: x.shape for p, x in tensors.items()}
      if len(set(shapes.values())) > 1:
        raise ValueError(f"{name} has shapes {shapes}: merging needs one architecture")
      value = merge_tensor(config, name, t, tensors, mask_fn)
      print(f"\r  merged {i + 1}/{len(first.names)} tensors", end="", flush=True)
      yield name, _cast(value, config.dtype)
    print(flush=True)

  with contextlib.ExitStack() as stack:
    hf_dir = hf_out
    if hf_dir is None:
      hf_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
          dir=out.parent if out.parent.exists() else None, prefix=".merge-")))
    created = not hf_dir.exists()
    try:
      hf_dir.mkdir(parents=True, exist_ok=True)
      hf.write_safetensors(merged(), hf_dir)
      (hf_dir / hf.HF_CONFIG).write_text(json.dumps(
          {**first.hf_config, "torch_dtype": config.dtype}, indent=2))
      for name, src in first.tokenizer_files.items():
        shutil.copyfile(src, hf_dir / name)
    except BaseException:
      if created and hf_out is not None:
        shutil.rmtree(hf_dir, ignore_errors=True)
      raise
    hf_to_llm(str(hf_dir), str(out))
  # the merge chats as the merged fine-tunes did: the data settings of the first listed
  # model that is a workdir (a base model may have no chat template)
  data_cfg = next((by_path[m.path].data_cfg for m in [*config.others, *config.models]
                   if by_path[m.path].data_cfg is not None), None)
  if data_cfg is not None:
    merged_wd = Workdir(out)
    merged = merged_wd.read_config()
    merged.data.chat = data_cfg.chat
    merged.data.seq_len = data_cfg.seq_len
    merged_wd.write_config(merged)
  return out


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "float32":
    return x.astype(np.float32)
  if dtype == "float16":
    return x.astype(np.float16)
  import ml_dtypes
  return x.astype(ml_dtypes.bfloat16)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  path = Path(FLAGS.config)
  if not path.is_file():
    raise ValueError(f"--config={FLAGS.config!r} is not a file")
  config = parse_config(path.read_text())
  merge(config, Path(FLAGS.out), Path(FLAGS.hf_out) if FLAGS.hf_out else None, FLAGS.seed)


if __name__ == "__main__":
  flags.DEFINE_string("config", None, "A mergekit-shaped YAML merge configuration.")
  flags.DEFINE_string("out", None, "The merged workdir to write (new or empty).")
  flags.DEFINE_string("hf_out", "", "Also write the merge as a Hugging Face directory.")
  flags.DEFINE_integer("seed", 0, "Seed of DARE's random masks.")
  flags.mark_flags_as_required(["config", "out"])
  cli.run(main)
