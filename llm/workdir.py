"""The run directory: what lives where, and loading a run for inference.

    DIR/config.json      the run's config (written once a run has started or resumed)
    DIR/config.py        a config file to train from (llm.convert output)
    DIR/tokenizer.model  the tokenizer (sentencepiece), unless data.tokenizer_path names one
    DIR/tokenizer.json   or a converted model's Hugging Face tokenizer (with its
                         tokenizer_config.json / chat_template.jinja beside it)
    DIR/data/            the tokenized corpus cache
    DIR/params/          a params-only Orbax checkpoint (llm.convert output), with its
                         manifest.json
    DIR/checkpoints/N/   training checkpoints: items state/, data/ (iterator), config/, and
                         manifest.json (sizes and CRC32s of every file, written last: a
                         checkpoint without one was never committed and is passed over)
    DIR/.lock            held (flock) by the run training in DIR
    DIR/rollouts/N.npz   a GRPO round's rows, kept for a checkpoint N taken inside the round
    DIR/metrics.jsonl    one JSON object per logged step; TensorBoard events beside it
    DIR/curves.png       llm.plot's default output for the run
    DIR/wandb/, DIR/wandb_run_id  with train.wandb_project: W&B's files and the run's id
    DIR/eval.json        llm.evaluate's result

Every module that reads or writes these asks this one. Loading for inference restores
the params subtree of the newest good checkpoint only: no optimizer is built or read; a
checkpoint whose files do not match its manifest, or that fails to restore, is passed
over with a warning for the one before it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import zlib
from pathlib import Path

import ml_collections

from llm import config as config_lib

CONFIG_JSON = "config.json"
CONFIG_PY = "config.py"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
DATA = "data"
PARAMS = "params"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
ROLLOUTS = "rollouts"
CURVES = "curves.png"
WANDB_ID = "wandb_run_id"
LOCK = ".lock"
MANIFEST = "manifest.json"
# items of one training checkpoint
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"


class Workdir:
  """Paths of one run directory."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def __repr__(self) -> str:
    return f"Workdir({str(self.path)!r})"

  config_json = property(lambda self: self.path / CONFIG_JSON)
  config_py = property(lambda self: self.path / CONFIG_PY)
  data = property(lambda self: self.path / DATA)
  params = property(lambda self: self.path / PARAMS)
  checkpoints = property(lambda self: self.path / CHECKPOINTS)
  metrics = property(lambda self: self.path / METRICS)
  eval_json = property(lambda self: self.path / EVAL)
  rollouts = property(lambda self: self.path / ROLLOUTS)
  curves = property(lambda self: self.path / CURVES)
  wandb_id = property(lambda self: self.path / WANDB_ID)

  def tokenizer(self, config) -> Path:
    """The run's tokenizer: data.tokenizer_path, else DIR/tokenizer.json (a converted
    model's Hugging Face tokenizer) if present, else DIR/tokenizer.model."""
    if config.data.tokenizer_path:
      return Path(config.data.tokenizer_path)
    hf = self.path / HF_TOKENIZER
    return hf if hf.is_file() else self.path / TOKENIZER

  def read_config(self) -> ml_collections.ConfigDict:
    if not self.config_json.is_file():
      raise FileNotFoundError(f"{self.config_json} does not exist: is {self.path} a training "
                              "or converted workdir?")
    return config_lib.from_json(self.config_json.read_text())

  def write_config(self, config) -> None:
    """Writes config.json atomically (a reader never sees half a file)."""
    self.path.mkdir(parents=True, exist_ok=True)
    tmp = self.config_json.with_name(f".{CONFIG_JSON}.{os.getpid()}.tmp")
    tmp.write_text(config_lib.to_json(config))
    os.replace(tmp, self.config_json)

  def lock(self) -> "RunLock":
    """Exclusive use of this directory by one run (see RunLock)."""
    return RunLock(self.path / LOCK)

  def checkpoint_steps(self) -> list[int]:
    """Steps of the finished training checkpoints, oldest first (Orbax writes a step into
    a temporary directory and renames it to its number when complete)."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir()
                  if p.is_dir() and p.name.isdigit())


class RunLock:
  """An flock on DIR/.lock naming its holder. The kernel drops it when the holding process
  dies, however it dies, so a killed run never leaves the directory stuck."""

  def __init__(self, path: Path):
    self.path = path
    self._fd: int | None = None

  def __enter__(self) -> "RunLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise RuntimeError(f"{self.path.parent} is in use by another run ({holder}); wait for it "
                         "to finish or stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                   f"{datetime.datetime.now().isoformat(timespec='seconds')}").encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # releases the flock
      self._fd = None


def _file_crc32(path: Path) -> int:
  crc = 0
  with open(path, "rb") as fh:
    while chunk := fh.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _checkpoint_files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
  """Records the size and CRC32 of every file of a finished checkpoint; written last
  (atomically), so its presence marks a checkpoint as complete."""
  files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "crc32": _file_crc32(p)}
           for p in _checkpoint_files(step_dir)}
  tmp = step_dir / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
  os.replace(tmp, step_dir / MANIFEST)


def is_sealed(step_dir: Path) -> bool:
  """Whether a checkpoint was committed: its manifest is written."""
  return (step_dir / MANIFEST).is_file()


def verify_checkpoint(step_dir: Path) -> str | None:
  """None when every file matches the manifest; else what is wrong, naming the file.
  A checkpoint without a manifest was never committed (its writer was killed between
  finishing the files and sealing them), so nothing vouches for its files: it is
  passed over like a damaged one (the one before it is sealed: llm.training.checkpoint)."""
  manifest_path = step_dir / MANIFEST
  if not step_dir.is_dir():
    return f"{step_dir} does not exist"
  if not manifest_path.is_file():
    if not _checkpoint_files(step_dir):
      return f"{step_dir} is empty"
    return (f"it has no {MANIFEST} (its writer stopped before sealing it), so its files "
            "cannot be verified")
  try:
    expected = json.loads(manifest_path.read_text())["files"]
  except (ValueError, KeyError) as e:
    return f"{manifest_path} is unreadable ({e})"
  for rel, want in sorted(expected.items()):
    path = step_dir / rel
    if not path.is_file():
      return f"{path} is missing"
    size = path.stat().st_size
    if size != want["size"]:
      return f"{path} has {size} bytes, the manifest says {want['size']}"
    if _file_crc32(path) != want["crc32"]:
      return f"{path} does not match its checksum (corrupted)"
  return None


class Damaged(Exception):
  """A checkpoint's contents could not be read (raised by `newest_good`'s attempts)."""


def newest_good(checkpoints: Path, steps: list[int], attempt, on_damaged=None):
  """(step, attempt(step)) for the newest of `steps` whose files match its manifest and
  whose `attempt` does not raise Damaged; a damaged one is warned about (naming the step
  and what is wrong) and handed to `on_damaged` before the one before it is tried. None
  when all are damaged. Any other exception from `attempt` propagates."""
  for step in sorted(steps, reverse=True):
    problem = verify_checkpoint(checkpoints / str(step))
    if problem is None:
      try:
        return step, attempt(step)
      except Damaged as e:
        problem = str(e)
    warn(f"checkpoint step {step} in {checkpoints} is damaged: {problem}; falling back to the "
         "one before it")
    if on_damaged is not None:
      on_damaged(step)
  return None


def describe(err: BaseException) -> str:
  """An exception's type and first line, for one-line messages."""
  lines = str(err).strip().splitlines()
  return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def load_tokenizer(workdir: str | os.PathLike, config):
  """The run's tokenizer (never trains one)."""
  from llm.data.tokenizer import check_vocab, open_tokenizer
  tok = open_tokenizer(Workdir(workdir).tokenizer(config))
  check_vocab(tok, config.model.vocab_size)
  return tok


def check_fits(config, target, where, model_cfg=None) -> None:
  """Raises ValueError, naming the params whose shapes differ (and, given the model config
  `model_cfg` that asks, the model fields that differ), unless the run saved with
  `config` holds every param of `target` at its shape."""
  import jax

  from llm.model import unbox
  from llm.params import abstract_params
  flat = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)  # noqa: E731
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(unbox(abstract_params(config.model))), flat(target)
  bad = [f"{k}: {'absent' if k not in have else list(have[k])} there, {list(v)} here"
         for k, v in want.items() if have.get(k) != v]
  if not bad:
    return
  fields = ""
  if model_cfg is not None:
    then, now = config_lib.flatten(config.model), config_lib.flatten(model_cfg)
    diff = [f"model.{k} {then.get(k)!r} vs {now[k]!r}" for k in sorted(now)
            if then.get(k) != now[k] and not k.startswith("lora.")]
    fields = f" ({', '.join(diff)} there vs here)" if diff else ""
  raise ValueError(f"{where} holds a model of another shape than this one{fields}: "
                   f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


def load_params(workdir: str | os.PathLike, step: int | None = None, target=None,
                merge_lora: bool = True, model_cfg=None):
  """(config, params) of `workdir`: the params of its newest training checkpoint (or of
  `step`), else its params-only checkpoint (llm.convert output); replicated over the
  local devices, or placed as `target` (a tree of sharded ShapeDtypeStructs) says. A
  LoRA run's adapters are joined to its base and, unless a target is given or
  `merge_lora` is False, folded into it (the config returned then has no LoRA). With a
  target, a run of another model shape is refused naming what differs (`model_cfg`, the
  model config that asks, lets the message name the config fields)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from llm.model import unbox
  from llm.params import abstract_params

  wd = Workdir(workdir)
  config = wd.read_config()
  placed = target is not None  # restoring for training: keep adapters apart
  if target is None:
    replicated = NamedSharding(jax.sharding.Mesh(jax.local_devices(), ("all",)), P())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          unbox(abstract_params(config.model)))
  if placed:
    check_fits(config, target, wd.path, model_cfg)
  steps = wd.checkpoint_steps()
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {wd.checkpoints}; have {steps}")
  from llm.model import lora
  lora_run = bool(config.model.lora.rank)
  full_target = target
  if lora_run:  # the checkpoints hold the adapters; the base is train.init_params
    target = lora.split(full_target)[1]

  def restore(candidate: int):
    try:
      return _restore_subtree((wd.checkpoints / str(candidate) / STATE_ITEM).absolute(),
                              {"params": target})["params"]
    except Exception as e:  # noqa: BLE001 (any failure to read it is damage)
      raise Damaged(f"it could not be restored ({describe(e)})") from e

  found = newest_good(wd.checkpoints, steps if step is None else [step], restore)
  if found is not None:
    if not lora_run:
      return config, found[1]
    params = lora.join(lora_base(config, lora.split(full_target)[0]), found[1])
    if placed or not merge_lora:
      return config, params
    merged, config.model = lora.merge(params, config.model)  # inference: adapters folded in
    return config, merged
  if step is not None:
    raise ValueError(f"checkpoint step {step} in {wd.checkpoints} is damaged (see the warning)")
  if wd.params.is_dir():
    return config, restore_params(wd.params, target)
  if steps:
    raise ValueError(f"every checkpoint in {wd.checkpoints} is damaged (see the warnings)")
  raise FileNotFoundError(f"no checkpoint in {wd.checkpoints} and no {wd.params}")


def lora_base(config, base_target):
  """The frozen base of a LoRA run, placed like `base_target`: train.init_params, else
  the run's seeded initialisation; quantized when model.lora.base_quant says so (QLoRA:
  the float base is read, then quantized in place)."""
  import jax
  import ml_collections

  from llm.model import init_params, lora, make_model, quant, unbox
  from llm.parallel.mesh import MESH_AXES
  from llm.parallel.rules import logical_to_sharding
  kind = config.model.lora.base_quant
  if kind == "none":
    if config.train.init_params:
      return restore_params(config.train.init_params, base_target,
                            partial=config.model.head != "lm", model_cfg=config.model)
    shardings = jax.tree.map(lambda a: a.sharding, base_target)
    init = lambda: lora.split(unbox(init_params(make_model(config.model),  # noqa: E731
                                                jax.random.key(config.seed),
                                                config.data.seq_len)))[0]
    return jax.jit(init, out_shardings=shardings)()
  if not config.train.init_params:
    raise ValueError(f"model.lora.base_quant={kind!r} (QLoRA) quantizes a pretrained base: "
                     "set train.init_params to a converted or trained workdir")
  float_cfg = ml_collections.ConfigDict(config.model.to_dict())
  float_cfg.lora.update(rank=0, base_quant="none")
  mesh = jax.tree.leaves(base_target)[0].sharding.mesh
  boxed = jax.eval_shape(lambda: init_params(make_model(float_cfg), jax.random.key(0), 8))
  if set(MESH_AXES) <= set(mesh.axis_names):  # a training mesh: shard like the model
    float_shardings = logical_to_sharding(boxed, mesh)
  else:  # inference: replicated like the target
    float_shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()), unbox(boxed))
  float_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              unbox(boxed), float_shardings)
  base = restore_params(config.train.init_params, float_target, model_cfg=float_cfg)
  shardings = jax.tree.map(lambda a: a.sharding, base_target)
  return jax.jit(lambda b: quant.quantize_base(b, kind), out_shardings=shardings)(base)


def save_params(path: str | os.PathLike, params) -> None:
  """Saves a params-only checkpoint (e.g. converted weights) to `path`."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).absolute(), params)
    ckptr.wait_until_finished()
  write_manifest(Path(path))  # verified when it is restored


def restore_params(path: str | os.PathLike, target, partial: bool = False, model_cfg=None):
  """Restores a params-only checkpoint, or the params of a run directory's newest good
  checkpoint, onto the shapes and shardings of `target`; with `partial` the checkpoint
  may hold more than `target` asks for (e.g. a language model's unembedding when a
  reward model takes its backbone)."""
  import orbax.checkpoint as ocp
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"params checkpoint {str(path)!r} does not exist")
  if (path / CONFIG_JSON).is_file():  # a workdir
    return load_params(path, target=target, model_cfg=model_cfg)[1]
  problem = verify_checkpoint(path) if is_sealed(path) else None  # (older ones have none)
  if problem:
    raise ValueError(f"params checkpoint {str(path)!r} is damaged: {problem}")
  try:
    if partial:
      return _restore_subtree(path, target)
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, target)
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise ValueError(f"params checkpoint {str(path)!r} does not restore onto this model "
                     f"({describe(e)})") from e


def _restore_subtree(path: Path, target):
  """The parts of the PyTree checkpoint at `path` that `target` (sharded
  ShapeDtypeStructs) names, placed as it says; the rest of the checkpoint is not read."""
  import jax
  import orbax.checkpoint as ocp
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
