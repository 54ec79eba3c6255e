"""Distillation: the loss on a packed batch against TRL 1.16's GKDTrainer.generalized_jsd_loss
on the two models' full logits, a teacher of another size sharded on the mesh, on-policy
steps, and a teacher with another tokenizer refused in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import forward, init_params, make_model, unbox
from llm.objectives.distill import distill_loss
from tests.helpers import losses, tiny_config

torch = pytest.importorskip("torch")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")


def _teacher_cfg(cfg):
  teacher = tiny_config()
  teacher.model.update(d_model=cfg.model.d_model * 2, n_layers=cfg.model.n_layers + 1,
                       d_ff=cfg.model.d_ff * 2)
  return teacher


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_is_trls_on_the_full_logits(beta):
  from llm.data.sft import pack
  cfg = tiny_config()
  cfg.train.update(objective="distill", loss_chunk=8)
  cfg.train.distill.update(teacher="unused", beta=beta)
  rng = np.random.default_rng(0)
  ids = [rng.integers(3, 500, n).astype(np.int32) for n in (9, 6, 12)]
  masks = [np.arange(len(x)) >= k for x, k in zip(ids, (4, 2, 7))]
  batch = {k: jnp.asarray(v) for k, v in pack(ids, masks, seq_len=16).items()}
  student, teacher = make_model(cfg.model), make_model(_teacher_cfg(cfg).model)
  params = unbox(init_params(student, jax.random.key(0), 8))
  teacher_params = unbox(init_params(teacher, jax.random.key(1), 8))
  total, sums = distill_loss(params, batch, model=student, config=cfg, teacher=teacher,
                             frozen=teacher_params)
  logits_s = np.asarray(forward(student, params, batch)[0], np.float64)
  logits_t = np.asarray(forward(teacher, teacher_params, batch)[0], np.float64)
  # TRL's labels: -100 off the completion; its rows are ours (one row per packed row)
  labels = torch.where(torch.tensor(np.asarray(batch["loss_mask"])) > 0, 1, -100)
  theirs = gkd.GKDTrainer.generalized_jsd_loss(torch.tensor(logits_s), torch.tensor(logits_t),
                                               labels=labels, beta=beta)
  assert float(sums["weight"]) == float(jnp.sum(batch["loss_mask"]))
  np.testing.assert_allclose(float(total) / float(sums["weight"]), theirs.item(), rtol=1e-4)


def _chat_data(path, n=120):
  with open(path, "w") as f:
    for i in range(n):
      word = ["apple", "river", "stone", "cloud"][i % 4]
      f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {word}."},
                                       {"role": "assistant", "content": word}]}) + "\n")


def test_a_run_moves_the_student_to_a_larger_teacher_on_and_off_policy(config, tmp_path,
                                                                      tokenizer_path):
  from llm.train import train
  from llm.workdir import Workdir, save_params
  teacher_cfg = _teacher_cfg(config)
  teacher_cfg.data.tokenizer_path = tokenizer_path
  teacher = Workdir(tmp_path / "teacher")
  teacher_params = unbox(init_params(make_model(teacher_cfg.model), jax.random.key(7), 8))
  teacher_params["unembed"] = teacher_params["unembed"] * 50.0  # a teacher with opinions
  save_params(teacher.params, teacher_params)
  teacher.write_config(teacher_cfg)
  _chat_data(tmp_path / "chat.jsonl")
  config.train.update(objective="distill", steps=6, eval_every=2, checkpoint_every=6,
                      log_every=1, eval_batches=2, batch_size=4)
  config.train.distill.update(teacher=str(tmp_path / "teacher"), lmbda=0.5, max_new_tokens=8,
                              beta=0.5)
  config.data.update(source="jsonl", paths=str(tmp_path / "chat.jsonl"), seq_len=64,
                     val_fraction=0.1)
  config.data.chat.template = "mistral"
  config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  config.mesh.fsdp = 2  # student and teacher both sharded over two devices
  last = train(config, tmp_path / "run", devices=jax.devices()[:2])
  assert "eval_perplexity" not in last
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  held_out = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  assert held_out[6] < held_out[2]  # the student moves towards the teacher
  assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())

  # a Hugging Face teacher directory reads as the workdir it was exported from
  from llm.convert import llm_to_hf
  from llm.objectives.distill import _teacher_source
  llm_to_hf(str(tmp_path / "teacher"), str(tmp_path / "teacher_hf"))
  cfg_hf, tok_hf, load_hf = _teacher_source(str(tmp_path / "teacher_hf"))
  cfg_wd, _, load_wd = _teacher_source(str(tmp_path / "teacher"))
  assert cfg_hf.d_model == cfg_wd.d_model and tok_hf.read_bytes() == open(tokenizer_path,
                                                                            "rb").read()
  one = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("x",)),
                                   jax.sharding.PartitionSpec())
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                        unbox(init_params(make_model(cfg_wd), jax.random.key(0), 8)))
  for a, b in zip(jax.tree.leaves(load_hf(target)), jax.tree.leaves(load_wd(target))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

  other = tmp_path / "other_tok.model"
  other.write_bytes(open(tokenizer_path, "rb").read() + b"\0")
  teacher_cfg.data.tokenizer_path = str(other)
  teacher.write_config(teacher_cfg)
  config.mesh.fsdp = 1
  with pytest.raises(ValueError, match=r"has another tokenizer .*other_tok.model\) than the "
                                       r"run's .*: distillation compares"):
    train(config, tmp_path / "run2", devices=jax.devices()[:1])
