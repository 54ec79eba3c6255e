"""distill: a student trained on a teacher's next-token distributions (knowledge
distillation; TRL 1.16's GKDTrainer conventions). The teacher is another workdir or a
Hugging Face directory (train.distill.teacher), of any size, sharded on the same mesh by
the same rules and never trained; it must share the run's tokenizer.

The data are chat examples (as sft); the loss, per completion token, is the generalised
JSD of the student's distribution from the teacher's (train.distill.beta: 0 the forward
KL(teacher || student), 1 the reverse KL(student || teacher), between them the JSD with
that mixture weight; llm.ops.divergence, both heads fused and chunked), one token mean
over the batch, as TRL's generalized_jsd_loss reduces it ("batchmean" over the tokens).
On-policy (train.distill.lmbda, GKD's): at each step, with that probability (drawn from
the seed and the step, so a resumed run draws the same), the batch's completions are
replaced by the student's own samples (drawn by train.sampler, llm.training.samplers;
train.distill.temperature, train.distill.max_new_tokens) before the loss reads them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm import config as config_lib
from llm.config import check_range
from llm.convert import hf
from llm.convert.__main__ import read_hf_config
from llm.data import chat
from llm.data.sft import CHAT_EXAMPLES, pack
from llm.inference.sampling import SamplingParams
from llm.model import forward, init_params, make_model, unbox
from llm.model.transformer import unembedding
from llm.objectives.base import Objective, PackedBatches, global_batch, with_aux
from llm.objectives.pretrain import perplexity
from llm.ops.divergence import generalized_jsd
from llm.parallel import pipeline
from llm.parallel.rules import logical_to_sharding
from llm.training.samplers import SAMPLERS
from llm.workdir import Workdir, load_params


def distill_loss(params, batch, *, model, config, teacher, frozen, rng=None):
  """Sum over the completion tokens of the divergence of the student (params) from the
  teacher (`frozen`: the teacher's params; `teacher`: its model). Weight: tokens.
  Metrics: loss (the mean divergence per token), and the model's auxiliary losses."""
  x_BTD, aux = forward(model, params, batch, rng, head=False)
  teacher_x_BTE, _ = forward(teacher, frozen, batch, head=False)
  per_token_BT = generalized_jsd(x_BTD, unembedding(params, model.cfg), teacher_x_BTE,
                                 unembedding(frozen, teacher.cfg),
                                 beta=config.train.distill.beta,
                                 chunk_len=config.train.loss_chunk,
                                 softcap=model.cfg.final_logit_softcap,
                                 teacher_softcap=teacher.cfg.final_logit_softcap)
  mask_BT = batch["loss_mask"]
  tokens = jnp.sum(mask_BT)
  total = jnp.sum(per_token_BT * mask_BT)
  return with_aux(total, {"loss": total, "weight": tokens}, aux, tokens)


# ------------------------------------------------------------------ the teacher


def _teacher_source(path: str):
  """(model config, tokenizer file or None, load(target) -> params) of a teacher: a
  workdir (its newest checkpoint or params; a LoRA run with its adapters) or an HF
  directory."""
  wd = Workdir(path)
  if wd.config_json.is_file() and (wd.params.exists() or wd.checkpoints.exists()):
    config = wd.read_config()
    tok = wd.tokenizer(config)
    return (config.model, tok if tok.is_file() else None,
            lambda target: load_params(path, target=target, model_cfg=config.model)[1])
  if not (Path(path) / hf.HF_CONFIG).is_file():
    raise ValueError(f"train.distill.teacher={path!r} is neither a workdir nor a Hugging Face "
                     "directory")
  cfg = config_lib.base_config()
  cfg.model.update(hf.model_updates_from_hf(read_hf_config(Path(path))))
  tok = next((Path(path) / n for n in ("tokenizer.json", "tokenizer.model")
              if (Path(path) / n).is_file()), None)

  def load(target):
    params = hf.hf_to_params(hf.SafetensorsReader(path), cfg.model)
    def place_on_mesh(a, t):
      a = np.asarray(a, t.dtype)  # once per leaf, not per shard
      return jax.make_array_from_callback(t.shape, t.sharding, lambda index: a[index])

    return jax.tree.map(place_on_mesh, params, target)

  return cfg.model, tok, load


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def bind(config) -> dict:
  """The teacher model the loss runs (from the teacher's own config)."""
  return {"teacher": make_model(_teacher_source(config.train.distill.teacher)[0],
                                config.train.pipeline_microbatches)}


class DistillBatches(PackedBatches):
  """Packed chat rows (with on-policy steps, GKD's lmbda), plus the teacher's params on
  the mesh as the frozen input of the loss."""

  def __init__(self, objective, run):
    d = run.config.train.distill
    teacher_cfg, teacher_tok, load = _teacher_source(d.teacher)
    run_tok = run.corpus.tokenizer.path
    if teacher_tok is None or _sha256(teacher_tok) != _sha256(run_tok):
      what = ("has no tokenizer file to compare with" if teacher_tok is None else
              f"has another tokenizer ({teacher_tok}) than")
      raise ValueError(f"train.distill.teacher={d.teacher!r} {what} the run's ({run_tok}): "
                       "distillation compares the two models' next-token distributions token "
                       "by token, so both must use one tokenizer; set data.tokenizer_path to "
                       "the teacher's")
    if teacher_cfg.vocab_size != run.config.model.vocab_size:
      raise ValueError(f"train.distill.teacher={d.teacher!r} has model.vocab_size="
                       f"{teacher_cfg.vocab_size}, the student {run.config.model.vocab_size}")
    if d.lmbda and jax.process_count() > 1:
      raise ValueError("train.distill.lmbda > 0 samples completions on one host; run one "
                       "process, or set lmbda=0 (off-policy)")
    mesh = run.batch_sharding.mesh
    stages = pipeline.stages(mesh)
    if stages > 1:  # the teacher runs in the same pipelined step, cut like the student
      if not pipeline.splits(teacher_cfg, stages):
        raise ValueError(f"train.distill.teacher={d.teacher!r} cannot run on mesh.pipeline="
                         f"{stages}: its model.n_layers={teacher_cfg.n_layers} (scan_layers="
                         f"{teacher_cfg.scan_layers}) does not split into "
                         f"{stages * teacher_cfg.pipeline_repeats} chunks of scanned layers")
    boxed = jax.eval_shape(lambda: init_params(make_model(teacher_cfg), jax.random.key(0),
                                               run.config.data.seq_len))
    self.frozen_shardings = logical_to_sharding(boxed, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          unbox(boxed), self.frozen_shardings)
    self.frozen = (load(target),)
    if jax.process_index() == 0:
      n = sum(x.size for x in jax.tree.leaves(self.frozen[0]))
      print(f"distilling from {d.teacher} ({n:,} params, beta {d.beta}, on-policy fraction "
            f"lmbda {d.lmbda})", flush=True)
    super().__init__(objective, run)
    self.sampler = None if not d.lmbda else SAMPLERS[run.config.train.sampler](
        run.config.model, mesh, chat.stop_ids(run.corpus.tokenizer),
        max_model_len=run.config.data.seq_len, max_num_seqs=2 * run.config.train.batch_size)

  def evaluate(self, params) -> dict:
    """eval_loss: the mean divergence per held-out completion token (no perplexity: it is
    not a cross-entropy)."""
    out = super().evaluate(params)
    out.pop("eval_perplexity", None)
    out.pop("unigram_loss", None)
    return out

  def summary(self, step: int, last: dict) -> str | None:
    if "eval_loss" not in last:
      return None
    return (f"done at step {step}: held-out divergence from the teacher "
            f"{last['eval_loss']:.4f} per completion token")

  def next(self, state, step: int) -> dict:
    local = next(self.iterator)
    d, c = self.run.config.train.distill, self.run.config
    on_policy = d.lmbda and np.random.default_rng([c.seed, step]).random() < d.lmbda
    if on_policy:
      local = self._sampled(state.params, local, step)
    return global_batch(local, self.run.batch_sharding, self.keys)

  def _sampled(self, params, rows: dict, step: int) -> dict:
    """The rows' examples with their completions replaced by the student's samples: each
    example's prompt (its tokens before the first loss-mask token) completed, repacked."""
    d, seq_len = self.run.config.train.distill, self.run.config.data.seq_len
    prompts = []
    for r in range(len(rows["inputs"])):
      for seg in np.unique(rows["segment_ids"][r][rows["segment_ids"][r] > 0]):
        where = np.flatnonzero(rows["segment_ids"][r] == seg)
        learned = np.flatnonzero(rows["loss_mask"][r][where] > 0)
        if len(learned):  # inputs up to and with the token before the first target
          prompts.append(np.asarray(rows["inputs"][r][where[:learned[0] + 1]]))
    prompts = [p[-(seq_len - d.max_new_tokens):] for p in prompts]
    completions = self.sampler.generate(
        params, prompts, 1, d.max_new_tokens, SamplingParams(temperature=d.temperature),
        seed=self.run.config.seed * 1_000_003 + step).ids
    ids = [np.concatenate([p, np.asarray(c, np.int32)]) for p, c in zip(prompts, completions)]
    masks = [np.arange(len(x)) >= len(p) for x, p in zip(ids, prompts)]
    packed = pack(ids, masks, seq_len)
    n_rows, kept = len(rows["inputs"]), len(packed["inputs"])
    if kept >= n_rows:  # the rows that fit the batch (the rest: next time)
      return {k: v[:n_rows] for k, v in packed.items()}
    return {k: np.concatenate([v, np.zeros((n_rows - kept, *v.shape[1:]), v.dtype)])
            for k, v in packed.items()}  # padding rows: segment 0, no loss


def check(config) -> None:
  d = config.train.distill
  if not d.teacher:
    raise ValueError("train.objective='distill' needs train.distill.teacher: a workdir or a "
                     "Hugging Face directory")
  check_range("train.distill.beta", d.beta, lo=0, hi=1)
  check_range("train.distill.lmbda", d.lmbda, lo=0, hi=1)
  check_range("train.distill.temperature", d.temperature, lo=0, lo_open=True)
  check_range("train.distill.max_new_tokens", d.max_new_tokens, lo=1,
              hi=config.data.seq_len - 1, note="below data.seq_len, which holds the prompt too")


OBJECTIVE = Objective(loss=distill_loss, data=CHAT_EXAMPLES, batches=DistillBatches,
                      heldout=perplexity, check=check, bind=bind)
