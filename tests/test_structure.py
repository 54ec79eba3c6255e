"""The package's shape: dependencies point one way, every choice list lives in one
registry that validation reads, and the seams (objectives, MLP kinds) take a new entry
without edits elsewhere."""

import ast
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm.model import mlp as mlp_lib
from llm.model.layers import add_aux_loss
from llm import objectives
from llm.objectives.base import Objective
from llm.objectives.pretrain import next_token
from tests.helpers import losses

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm"


def _module(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
  """module -> the llm modules it imports anywhere in its source (module level or not)."""
  files = {_module(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        out.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                          + ([node.module] if node.module else []))
        subs = {f"{base}.{a.name}" for a in node.names} & set(files)
        out.update(subs or {base})
    graph[name] = {m for m in out if m in files and m != name}
  return graph


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_no_import_cycles():
  graph = _import_graph()
  cycles = [m for m in graph if m in _reachable(graph, m)]
  assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_config_imports_nothing_from_llm():
  assert _import_graph()["llm.config"] == set()


@pytest.mark.parametrize("package", ["llm.inference", "llm.eval"])
def test_inference_and_evaluation_do_not_import_training(package):
  graph = _import_graph()
  for module in [m for m in graph if m == package or m.startswith(package + ".")]:
    bad = {m for m in _reachable(graph, module) | {module}
           if m in ("llm.train", "llm.training") or m.startswith("llm.training.")}
    assert not bad, f"{module} reaches {sorted(bad)}"


def test_run_directory_names_live_in_workdir_only():
  """Nobody but llm/workdir.py spells the run directory's file names."""
  names = ('"config.json"', '"metrics.jsonl"', '"eval.json"', '"checkpoints"')
  for path in PACKAGE.rglob("*.py"):
    if path.name == "workdir.py" or path.parent.name == "convert":
      continue  # convert/ reads and writes Hugging Face directories, whose names coincide
    text = path.read_text()
    assert not [n for n in names if n in text], f"{path} names a run-directory file"


@pytest.mark.parametrize("field", sorted(config_lib.CHOICES))
def test_every_choice_is_validated_against_its_registry(field):
  allowed = list(config_lib.registry(config_lib.CHOICES[field]))
  assert allowed, field
  cfg = config_lib.base_config()
  section, _, key = field.rpartition(".")
  node = cfg
  for part in section.split("."):
    node = node[part]
  node[key] = "no-such-choice"
  with pytest.raises(ValueError, match=rf"{field}='no-such-choice' is not allowed; choose one of "
                                       rf"\[{', '.join(repr(a) for a in allowed)}\]".replace(".", r"\.")):
    config_lib.validate(cfg)


class _DenseWithPenalty(mlp_lib.SwiGLU):
  """The dense MLP plus an auxiliary loss (a stand-in for MoE load balancing)."""

  @nn.compact
  def __call__(self, x_BTD):
    out_BTD = super().__call__(x_BTD)
    add_aux_loss(self, "activation_penalty", 0.5 * jnp.mean(jnp.square(out_BTD)))
    return out_BTD


def _twice_the_loss(params, batch, *, model, config):
  total, sums = next_token(params, batch, model=model, config=config)
  return 2 * total, {**sums, "loss": 2 * sums["loss"]}


def test_a_new_mlp_kind_and_objective_are_one_registry_line_each(config, tmp_path, monkeypatch):
  """Registering an MLP kind whose layers sow an auxiliary loss, and an objective, is all
  it takes: validation accepts them, the aux loss reaches the objective summed over layers
  and is logged by name."""
  monkeypatch.setitem(mlp_lib.MLPS, "dense_with_penalty", _DenseWithPenalty)
  monkeypatch.setitem(objectives.OBJECTIVES, "twice", Objective(loss=_twice_the_loss))
  config.model.mlp = "dense_with_penalty"
  config.train.update(objective="twice", steps=2, eval_every=2, checkpoint_every=2)
  config_lib.validate(config)

  from llm.data import pipeline
  from llm.model import forward, init_params, make_model, unbox
  model = make_model(config.model)
  params = unbox(init_params(model, jax.random.key(0), config.data.seq_len))
  rows = pipeline.DOCUMENTS.prepare(config, tmp_path / "data").train
  batch = {k: jnp.asarray(np.stack([rows[i][k] for i in range(2)])) for k in rows[0]}
  _, aux = forward(model, params, batch)
  # the reference: each layer's penalty, computed from the same forward by hand
  _, sown = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                        batch["positions"], mutable=["aux_losses"])
  per_layer = sown["aux_losses"]["layers"]["mlp"]["activation_penalty"][0]
  assert per_layer.shape == (config.model.n_layers,)
  np.testing.assert_allclose(aux.losses["activation_penalty"], float(jnp.sum(per_layer)), rtol=1e-6)
  base_total, sums = next_token(params, batch, model=model, config=config)
  np.testing.assert_allclose(
      float(base_total),
      float(sums["loss"] + config.train.z_loss * sums["z_loss"] + sums["weight"] * aux.losses["activation_penalty"]),
      rtol=1e-6)

  from llm.train import train
  train(config, tmp_path / "run", devices=jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  first = next(r for r in records if "loss" in r)
  assert first["activation_penalty"] > 0
  assert first["objective"] == pytest.approx(
      first["loss"] + 2 * config.train.z_loss * first["z_loss"] + 2 * first["activation_penalty"],
      rel=1e-5)
  assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_the_loop_the_pipeline_and_evaluate_name_no_objective():
  """What differs between objectives lives in llm/objectives/: the training loop, the data
  pipeline and llm.evaluate spell no objective's name (nor its modules')."""
  names = set(objectives.OBJECTIVES) | {"preference", "prompts", "rollouts", "reference"}
  for rel in ("training/loop.py", "data/pipeline.py", "evaluate.py", "eval/heldout.py"):
    tree = ast.parse((PACKAGE / rel).read_text())
    spelled = {n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names}
    spelled |= {part for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names for part in f"{getattr(n, 'module', '') or ''}.{a.name}".split(".")
                if part in names}
    spelled |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in names}
    assert not spelled, f"llm/{rel} names {sorted(spelled)}"
