"""The base configuration and its validation.

Every recipe in configs/ starts from `base_config()` and overrides a few
fields; the command line overrides those (`--config.model.n_layers=4`), and Python
(notebooks, scripts) does the same with `load_config("tiny", {"model.n_layers": 4})`.
`validate(config)` rejects bad values with a message naming the value and
what is allowed, before anything expensive happens.

This module imports nothing from the library (anything may import it). The allowed
values of each choice field live once, in a registry beside their implementations;
`CHOICES` says where each registry is, and `validate` reads them from there.
"""

from __future__ import annotations

import codecs
import importlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import ml_collections

# choice field -> "module:REGISTRY" whose keys are the allowed values.
CHOICES = {
    "model.attention": "llm.ops.attention:IMPLEMENTATIONS",
    "model.mlp": "llm.model.mlp:MLPS",
    "model.head": "llm.model.transformer:HEADS",
    "model.moe.compute": "llm.ops.moe:COMPUTE",
    "model.lora.base_quant": "llm.model.quant:BASE_QUANT",
    "model.weight_quant": "llm.model.quant:WEIGHT_QUANT",
    "model.kv_quant": "llm.model.quant:KV_QUANT",
    "train.quantization": "llm.model.quant:TRAINING_QUANT",
    "model.remat": "llm.model.transformer:REMAT_POLICIES",
    "model.dtype": "llm.model.layers:DTYPES",
    "model.param_dtype": "llm.model.layers:DTYPES",
    "model.rope_scaling.type": "llm.model.layers:ROPE_SCALINGS",
    "model.mlp_activation": "llm.model.layers:ACTIVATIONS",
    "data.source": "llm.data.sources:SOURCES",
    "data.tokenizer_model_type": "llm.data.tokenizer:MODEL_TYPES",
    "data.chat.template": "llm.data.chat:TEMPLATE_CHOICES",
    "data.chat.loss_on": "llm.data.chat:LOSS_ON",
    "data.chat.overlong": "llm.data.chat:OVERLONG",
    "train.objective": "llm.objectives:OBJECTIVES",
    "train.dpo.loss_type": "llm.objectives.dpo:LOSS_TYPES",
    "train.dpo.reference": "llm.training.reference:REFERENCE_MODES",
    "train.kto.loss_type": "llm.objectives.kto:LOSS_TYPES",
    "train.kto.reference": "llm.training.reference:REFERENCE_MODES",
    "train.grpo.loss_type": "llm.objectives.grpo:LOSS_TYPES",
    "train.grpo.importance_sampling_level": "llm.objectives.grpo:IMPORTANCE_SAMPLING_LEVELS",
    "train.grpo.scale_rewards": "llm.training.rewards:SCALE_REWARDS",
    "train.grpo.old_logps": "llm.training.rollouts:OLD_LOGPS",
    "train.grpo.importance_sampling_correction": "llm.training.rollouts:IS_CORRECTIONS",
    "train.sampler": "llm.training.samplers:SAMPLERS",
    "optim.schedule": "llm.training.optim:SCHEDULES",
    "train.progress": "llm.training.metrics:PROGRESS",
    "distributed.initialize": "llm.parallel.distributed:MODES",
}
MESH_AXES_REGISTRY = "llm.parallel.mesh:MESH_AXES"
CURATION_REGISTRY = "llm.data.curate:STAGES"
LORA_TARGETS_REGISTRY = "llm.model.lora:TARGETS"
# the objective's own checks: its data, its head and its settings (llm.objectives.check)
OBJECTIVE_CHECKS = "llm.objectives:check"


def registry(where: str):
  """The registry a `CHOICES` entry names (imported on first use)."""
  module, _, name = where.partition(":")
  return getattr(importlib.import_module(module), name)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32000,
      d_model=4096,
      n_layers=32,
      n_heads=32,
      n_kv_heads=32,
      head_dim=0,  # 0: d_model // n_heads
      d_ff=11008,
      norm_eps=1e-5,
      rope_theta=10000.0,
      rope_scaling=ml_collections.ConfigDict(dict(
          type="none",  # none | linear | dynamic (NTK) | yarn | llama3
          factor=8.0,
          low_freq_factor=1.0,  # llama3
          high_freq_factor=4.0,  # llama3
          original_max_position=8192,  # the pre-training context (dynamic: where scaling starts)
          beta_fast=32.0,  # yarn: the ramp between the dimensions turning this many times ...
          beta_slow=1.0,  # ... and this many times over the original context
          mscale=0.0,  # yarn: with mscale_all_dim, attention factor = m(mscale) / m(mscale_all_dim)
          mscale_all_dim=0.0,
          attention_factor=0.0,  # yarn: cos/sin scaled by this; 0 = 0.1 ln(factor) + 1
          truncate=True,  # yarn: the ramp's ends rounded to whole dimensions
      )),
      # local (sliding-window) layers' RoPE base, unscaled (Gemma 3); 0: rope_theta and
      # rope_scaling, as the global layers
      rope_local_theta=0.0,
      tie_embeddings=False,
      qk_norm=False,
      qkv_bias=False,  # biases on the q, k and v projections (Qwen2 / Qwen2.5)
      # Gemma: norms x (1 + scale) (scales stored as Gemma stores them), norms on the
      # attention and MLP outputs too (before the residual add), embeddings x sqrt(d_model),
      # a GeGLU MLP, logits soft-capped (cap x tanh(x / cap); 0 = off), the attention's
      # 1/sqrt scale from query_pre_attn_scalar (0: head dim)
      norm_plus_one=False,
      post_norms=False,
      embed_scale=False,
      mlp_activation="silu",  # silu (SwiGLU) | gelu_tanh (GeGLU)
      attn_logit_softcap=0.0,
      final_logit_softcap=0.0,
      query_pre_attn_scalar=0.0,
      attention="xla",  # xla | flash (Pallas kernel; interpreted on CPU) | cudnn (CUDA GPU)
      # multi-head latent attention (DeepSeek-V2/V3; llm.model.attention.LatentAttention):
      # kv_lora_rank > 0 replaces the q/k/v projections (head_dim and n_kv_heads unused)
      mla=ml_collections.ConfigDict(dict(
          kv_lora_rank=0,  # the cached latent's width; 0 = MLA off
          q_lora_rank=0,  # queries through a rank-q_lora_rank bottleneck; 0 = one projection
          qk_nope_head_dim=128,  # each head's query/key part without RoPE
          qk_rope_head_dim=64,  # and with RoPE (the key part is one, shared by the heads)
          v_head_dim=128,
      )),
      mlp="dense",  # the feed-forward kind (llm.model.mlp.MLPS)
      head="lm",  # lm (next-token logits) | score (a reward model's scalar; train.objective=reward)
      # multi-token prediction (DeepSeek-V3): D extra training heads, module k predicting
      # the token k+1 ahead; their mean cross-entropy x mtp_loss_weight joins the loss
      mtp_layers=0,
      mtp_loss_weight=0.3,
      # with mesh.pipeline = P: each stage runs its layers in this many separate chunks,
      # a microbatch going round the stages this many times (circular schedule; 1: GPipe)
      pipeline_repeats=1,
      moe=ml_collections.ConfigDict(dict(  # used when mlp="moe" (llm/model/moe.py)
          n_experts=8,
          top_k=2,  # experts per token
          d_ff=0,  # each expert's width; 0: model.d_ff
          n_shared=0,  # always-on experts added to the routed ones
          norm_topk_prob=True,  # renormalise the top-k probabilities (Mixtral; Qwen3 option)
          load_balance_weight=0.01,  # x n_experts * sum_i f_i P_i
          router_z_weight=0.001,  # x mean logsumexp(router logits)^2
          # dropless (ragged_dot) | megablox (Pallas TPU grouped matmul) | capacity (einsum
          # dispatch, drops overflow; all-to-all under expert parallelism)
          compute="dropless",
          capacity_factor=1.25,  # compute="capacity": slots per expert / (tokens * k / experts)
          every=1,  # every n-th layer is MoE (layers n-1, 2n-1, ...), the others dense d_ff
          first_dense=0,  # the first n layers dense d_ff (DeepSeek's first_k_dense_replace)
          router="softmax",  # softmax (then top-k) | sigmoid (DeepSeek-V3; llm.model.moe.ROUTERS)
          n_groups=1,  # group-limited routing: experts in n groups, tokens choose among ...
          topk_groups=1,  # ... the topk_groups groups with the best two-expert score sums
          routed_scaling=1.0,  # the routed experts' weights times this (routed_scaling_factor)
          # auxiliary-loss-free balancing (sigmoid router): a per-expert bias added to the
          # scores for choosing only, moved by this much per step towards even load
          routed_bias_update_rate=0.0,
      )),
      # LoRA adapters (llm/model/lora.py): rank 0 = off; with rank > 0 only the adapters
      # train (the base weights are frozen) and they are merged for generation and export
      lora=ml_collections.ConfigDict(dict(
          rank=0,
          alpha=16.0,  # the update is scaled by alpha / rank
          dropout=0.0,  # on the adapters' input while training
          targets="q,v",  # comma-separated: any of q, k, v, o, gate, up, down
          base_quant="none",  # QLoRA: the frozen base stored as int8 | nf4 (none: as is)
      )),
      # projection kernels stored int8 (per channel) | int4 (groups of 128) for serving:
      # weight-only quantized inference, written by `python -m llm.quantize` (llm/model/quant.py)
      weight_quant="none",
      kv_quant="none",  # int8: cached keys/values int8 with a scale per token and head
      flash_block_q=0,  # flash kernel block sizes; 0 = the kernel's default
      flash_block_k=0,
      sliding_window=0,  # attend to the last N positions only (Mistral); 0 = full
      # with sliding_window: every n-th layer (n-1, 2n-1, ...) attends globally, the others
      # within the window (Gemma 2: 2, Gemma 3: 6); 0: every layer uses the window
      sliding_window_pattern=0,
      scan_layers=True,
      # projection kernels stored [out..., in...] (torch Linear's layout) instead of
      # [in..., out...]: XLA:CPU runs matrix-vector products over them up to 1.3x faster.
      # llm.inference.Decoder switches it on when decoding on a CPU and transposes its copy
      # of the params (to_out_major in llm/model/transformer.py); checkpoints, HF export and
      # LoRA use the default layout
      out_major_kernels=False,
      remat="full",
      dtype="float32",  # compute dtype
      param_dtype="float32",
      init_std=0.02,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="shakespeare",
      paths="",  # comma-separated files/globs for source=text|jsonl
      jsonl_key="text",
      tfds_name="",  # e.g. "lm1b" for source=tfds (array_record data, no TensorFlow)
      tfds_dir="",
      tfds_key="text",
      doc_separator="",  # regex splitting a text file into documents; "" = one file, one document
      seq_len=256,
      val_fraction=0.05,
      tokenizer_path="",  # "" trains a sentencepiece model into the workdir
      tokenizer_model_type="bpe",
      tokenizer_max_chars=20_000_000,
      encoding="utf-8",  # text encoding of text/jsonl files (any Python codec name)
      encoding_errors="strict",  # strict: undecodable bytes are an error; replace: U+FFFD
      shuffle_seed=0,
      # token stores (llm/data/store.py) written by `python -m llm.data.prepare`: training
      # reads them lazily instead of data.source; several (comma-separated) are a mixture
      store="",
      store_weights="",  # comma-separated, one per store ("" = equal); normalised
      store_shards=16,  # prepare: shards of whole files, the units of parallel work
      # prepare: curation stages (llm/data/curate.py), run in the order quality, language,
      # exact_dedup, near_dedup, pii whatever the order named
      curate=ml_collections.ConfigDict(dict(
          stages="",  # comma-separated subset of llm.data.curate.STAGES
          near_dedup_threshold=0.8,  # estimated Jaccard similarity of word shingles
          near_dedup_shingle=5,  # words per shingle
          near_dedup_num_perm=128,  # MinHash permutations
          near_dedup_bands=0,  # LSH bands x rows <= num_perm; 0, 0 = datasketch's choice
          near_dedup_rows=0,
          min_words=50,  # quality (Gopher): document length in words
          max_words=100_000,
          min_mean_word_length=3.0,
          max_mean_word_length=10.0,
          max_symbol_word_ratio=0.1,  # "#" and ellipses per word
          min_alpha_word_fraction=0.8,  # words with a letter
          min_stop_words=2,  # of: the, be, to, of, and, that, have, with
          max_bullet_lines=0.9,
          max_ellipsis_lines=0.3,
          max_duplicate_lines=0.3,
          max_duplicate_line_chars=0.2,
          repetition_scale=1.0,  # multiplies Gopher's n-gram repetition limits
          languages="en",  # language: ISO 639-1 codes to keep
          language_min_confidence=0.5,
      )),
      # train.objective="sft": JSONL chat examples from data.paths (llm/data/chat.py)
      chat=ml_collections.ConfigDict(dict(
          template="",  # chatml | llama3 | mistral; "" = the tokenizer's chat_template
          loss_on="assistant",  # assistant (every assistant turn) | last | all
          overlong="truncate",  # examples over data.seq_len + 1 tokens: truncate | drop
      )),
  ))

  c.train = ml_collections.ConfigDict(dict(
      objective="pretrain",  # what the step minimises (llm.objectives.OBJECTIVES)
      batch_size=8,  # global, sequences per optimizer step
      grad_accum=1,
      # none | int8 | fp8: the projections' and experts' matmuls, forward and backward, run
      # quantized (qwix quantized training; llm.model.quant.for_training)
      quantization="none",
      # with mesh.pipeline > 1: each (accumulation) batch is cut into this many pipeline
      # microbatches; 0 = one per stage (llm/parallel/pipeline.py)
      pipeline_microbatches=0,
      steps=1000,
      z_loss=1e-4,
      # the LM head and cross-entropy run fused, this many positions per row at a time, so
      # the [B, T, V] logits never exist whole (llm.ops.cross_entropy); 0 = one chunk
      loss_chunk=128,
      # how on-policy objectives (grpo; distill with lmbda > 0) complete prompts with the
      # policy: engine (the serving engine, on the trainer's params) | decoder (static
      # batches); llm/training/samplers.py
      sampler="engine",
      log_every=10,
      eval_every=100,
      eval_batches=8,
      checkpoint_every=200,
      keep_checkpoints=3,
      async_checkpointing=True,
      peak_flops_per_device=0.0,  # 0: look up the device, or measure a matmul on CPU
      max_consecutive_skips=5,  # stop the run after this many non-finite steps in a row
      progress="auto",  # console: lines | bar (live, tqdm) | auto (a bar in a notebook)
      wandb_project="",  # log to Weights & Biases too ("" = off)
      wandb_entity="",
      wandb_mode="",  # online | offline | disabled; "" = WANDB_MODE or online
      init_params="",  # a workdir or params-only checkpoint (llm.convert output) to start from
      # train.objective="dpo": preference pairs in data.paths; the reference is init_params
      dpo=ml_collections.ConfigDict(dict(
          beta=0.1,
          loss_type="sigmoid",  # sigmoid (DPO) | ipo
          label_smoothing=0.0,  # sigmoid only: conservative DPO's eps
          rpo_alpha=0.0,  # RPO (TRL's "sft" term): + alpha x the batch's chosen-token NLL mean
          # precomputed (once over the data, cached) | live (per batch; LoRA: the base)
          reference="precomputed",
      )),
      # train.objective="distill": chat examples; a teacher's next-token distributions
      # (TRL's GKDConfig names)
      distill=ml_collections.ConfigDict(dict(
          teacher="",  # a workdir or a Hugging Face directory, with the run's tokenizer
          beta=0.5,  # 0: forward KL(teacher || student); 1: reverse KL; between: JSD
          lmbda=0.5,  # the fraction of steps on the student's own samples (on-policy)
          temperature=0.9,  # sampling temperature of those
          max_new_tokens=128,
      )),
      # train.objective="kto": unpaired examples (or pairs, unpaired); the reference as dpo's
      kto=ml_collections.ConfigDict(dict(
          beta=0.1,
          desirable_weight=1.0,
          undesirable_weight=1.0,
          loss_type="kto",  # kto | apo_zero_unpaired
          reference="precomputed",  # precomputed | live, as train.dpo.reference
      )),
      # train.objective="orpo": preference pairs, no reference (TRL's ORPOConfig names)
      orpo=ml_collections.ConfigDict(dict(
          beta=0.1,  # weight of the odds-ratio term (the paper's lambda)
      )),
      # train.objective="simpo": preference pairs, no reference (TRL's CPOConfig names,
      # loss_type="simpo")
      simpo=ml_collections.ConfigDict(dict(
          beta=0.1,
          simpo_gamma=0.5,  # the target reward margin
          label_smoothing=0.0,
          cpo_alpha=0.0,  # + alpha x the chosen completions' NLL (TRL's CPO-SimPO: 1.0)
          alpha=0.0,  # AlphaPO's reward shape; 0: log-probabilities
      )),
      # train.objective="reward": a reward model (model.head="score") on preference pairs
      reward=ml_collections.ConfigDict(dict(
          center_coefficient=0.0,  # + c x (r_chosen + r_rejected)^2 (TRL's center_rewards)
      )),
      # train.objective="grpo": prompts in data.paths; completions sampled by the policy,
      # scored by reward functions and/or a reward model (llm/objectives/grpo.py)
      grpo=ml_collections.ConfigDict(dict(
          num_generations=8,  # completions per prompt (G); train.batch_size = prompts x G
          max_new_tokens=32,  # per completion
          temperature=1.0,  # sampling (top_k 0 and top_p 1 are off)
          top_k=0,
          top_p=1.0,
          rewards="exact_match",  # comma-separated llm.training.rewards.REWARD_FUNCTIONS
          reward_model="",  # a reward-model workdir (objective "reward"); its score is a reward
          reward_weights="",  # comma-separated, one per reward (functions, then the model)
          scale_rewards="group",  # group | batch | none
          loss_type="dapo",  # dapo | grpo | dr_grpo | bnpo (TRL's aggregations)
          importance_sampling_level="token",  # token | sequence (GSPO)
          use_bias_correction_kl=True,  # KL x importance ratio (TRL's default)
          beta=0.04,  # KL penalty to the reference policy (k3); 0: no reference is kept
          epsilon=0.2,  # importance-ratio clip: [1 - epsilon, 1 + epsilon_high]
          epsilon_high=0.0,  # 0: epsilon
          num_iterations=1,  # optimizer steps per sampled batch (mu)
          # the importance ratio's denominator: trainer (a forward pass over each round,
          # which also gives the sampler-vs-trainer parity metrics) | sampler (the engine's
          # own log-probabilities: no pass; where the parity metrics show they agree)
          old_logps="trainer",
          # none | token_truncate | token_mask | sequence_truncate | sequence_mask: TRL's
          # vllm_importance_sampling_mode, weighting each token's policy loss by
          # exp(trainer - sampler logp), clipped (truncate) or zeroed (mask) outside
          # [clip_min, clip_max] (0: no lower bound); needs train.sampler=engine
          importance_sampling_correction="none",
          importance_sampling_clip_max=3.0,
          importance_sampling_clip_min=0.0,
          eval_prompts=64,  # held-out prompts answered greedily at each evaluation
      )),
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4,
      schedule="cosine",
      warmup_steps=100,
      min_lr_ratio=0.1,
      decay_fraction=0.2,  # wsd: final fraction of steps spent decaying
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
  ))

  c.mesh = ml_collections.ConfigDict(dict(pipeline=1, data=-1, expert=1, fsdp=1, tensor=1,
                                          sequence=1))

  # Multi-process runs (see llm/distributed.py); the defaults detect everything.
  c.distributed = ml_collections.ConfigDict(dict(
      initialize="auto",  # auto | always | never
      coordinator="",  # host:port of process 0
      num_processes=0,
      process_id=-1,
  ))
  return c


def comma_list(value: str) -> list[str]:
  """The non-empty, stripped items of a comma-separated config string."""
  return [item.strip() for item in value.split(",") if item.strip()]


def flatten(section) -> dict:
  """A config section as {"dotted.name": value} of its leaves."""
  out = {}
  for k, v in (section.to_dict() if hasattr(section, "to_dict") else section).items():
    if isinstance(v, dict):
      out.update({f"{k}.{name}": x for name, x in flatten(v).items()})
    else:
      out[k] = v
  return out


def scan_unit(model_cfg) -> tuple[int, int]:
  """(the layers after moe.first_dense, the length of their repeating pattern: the lcm of
  moe.every and sliding_window_pattern), which model.scan_layers scans in whole units."""
  m = model_cfg
  moe = m.mlp == "moe"
  return (m.n_layers - (m.moe.first_dense if moe else 0),
          math.lcm(m.moe.every if moe else 1, m.sliding_window_pattern or 1))


def kv_cache_vectors(model_cfg) -> tuple[int, int, bool]:
  """(vectors per token and layer, their width, shared): what a KV cache holds. Keys and
  values of n_kv_heads heads; with MLA one vector, the latent and the RoPE key, that is
  its own value (shared)."""
  if model_cfg.mla.kv_lora_rank:
    return 1, model_cfg.mla.kv_lora_rank + model_cfg.mla.qk_rope_head_dim, True
  return 2 * model_cfg.n_kv_heads, head_dim(model_cfg), False


def head_dim(model_cfg) -> int:
  return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def attention_width(model_cfg) -> int:
  """The head width attention runs at: head_dim, or with MLA the wider of a key
  (nope + rope) and a value (the other zero-padded to it)."""
  m = model_cfg.mla
  return max(m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim) if m.kv_lora_rank else \
      head_dim(model_cfg)


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_choices(config: ml_collections.ConfigDict) -> None:
  """Each choice field against its registry (see CHOICES)."""
  for field, where in CHOICES.items():
    _choice(field, _get(config, field), registry(where))


def check_range(name: str, value, lo=None, hi=None, lo_open: bool = False,
                hi_open: bool = False, note: str = "") -> None:
  """Raises ValueError unless `value` is a finite number within the bounds."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and lo is not None:
    ok = value > lo if lo_open else value >= lo
  if ok and hi is not None:
    ok = value < hi if hi_open else value <= hi
  if not ok:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    raise ValueError(f"{name}={value!r} must be in {span}" + (f" ({note})" if note else ""))


def _positive(name, value):
  check_range(name, value, lo=0, lo_open=True)


def _non_default(section: ml_collections.ConfigDict, default: ml_collections.ConfigDict,
                 prefix: str, skip=()) -> list[str]:
  given, base = section.to_dict(), default.to_dict()
  return [f"{prefix}.{k}={given[k]!r}" for k in sorted(given)
          if k not in skip and given[k] != base.get(k)]


def _check_unused_sections(config) -> None:
  """Settings of a part that is switched off would do nothing: refuse them, so a run is
  never silently other than the one asked for."""
  m, base = config.model, base_config().model
  if m.mlp != "moe":
    unused = _non_default(m.moe, base.moe, "model.moe")
    if unused:
      raise ValueError(f"{', '.join(unused)} set but model.mlp={m.mlp!r}: the model has no "
                       "experts; set model.mlp='moe' or leave model.moe.* at its defaults")
  if not m.lora.rank:
    unused = _non_default(m.lora, base.lora, "model.lora", skip=("rank", "base_quant"))
    if unused:
      raise ValueError(f"{', '.join(unused)} set but model.lora.rank=0 (LoRA off: the whole "
                       "model would train); set model.lora.rank > 0 to train adapters")


def _check_store(config) -> None:
  d, cu = config.data, config.data.curate
  if d.store_weights and not d.store:
    raise ValueError(f"data.store_weights={d.store_weights!r} is set without data.store")
  _positive("data.store_shards", d.store_shards)
  stages = comma_list(cu.stages)
  allowed = registry(CURATION_REGISTRY)
  for stage in stages:
    if stage not in allowed:
      raise ValueError(f"data.curate.stages={cu.stages!r} names {stage!r}; the stages are "
                       f"{list(allowed)} (comma-separated)")
  check_range("data.curate.near_dedup_threshold", cu.near_dedup_threshold, lo=0, hi=1,
              lo_open=True)
  for name in ("near_dedup_shingle", "near_dedup_num_perm", "min_words", "max_words"):
    _positive(f"data.curate.{name}", cu[name])
  for name in ("near_dedup_bands", "near_dedup_rows", "min_stop_words"):
    check_range(f"data.curate.{name}", cu[name], lo=0)
  if bool(cu.near_dedup_bands) != bool(cu.near_dedup_rows):
    raise ValueError("data.curate.near_dedup_bands and near_dedup_rows are set together "
                     "(both 0: chosen for the threshold)")
  if cu.near_dedup_bands * cu.near_dedup_rows > cu.near_dedup_num_perm:
    raise ValueError(f"data.curate.near_dedup_bands x near_dedup_rows = "
                     f"{cu.near_dedup_bands * cu.near_dedup_rows} exceeds near_dedup_num_perm="
                     f"{cu.near_dedup_num_perm}")
  for name in ("min_alpha_word_fraction", "max_bullet_lines", "max_ellipsis_lines",
               "max_duplicate_lines", "max_duplicate_line_chars", "language_min_confidence"):
    check_range(f"data.curate.{name}", cu[name], lo=0, hi=1)
  check_range("data.curate.max_words", cu.max_words, lo=cu.min_words, note=">= min_words")
  check_range("data.curate.max_mean_word_length", cu.max_mean_word_length,
              lo=cu.min_mean_word_length, note=">= min_mean_word_length")
  _positive("data.curate.repetition_scale", cu.repetition_scale)
  if "language" in stages and not comma_list(cu.languages):
    raise ValueError("data.curate.stages has 'language' but data.curate.languages is empty")
  for code in comma_list(cu.languages):
    if not re.fullmatch(r"[a-z]{2}", code.lower()):
      raise ValueError(f"data.curate.languages={cu.languages!r}: {code!r} is not an ISO 639-1 "
                       "code (two letters, e.g. 'en', 'de', 'fr'; comma-separated)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value and what is allowed."""
  check_choices(config)
  m, d, t, o = config.model, config.data, config.train, config.optim
  check_range("seed", config.seed, lo=0)
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
               "norm_eps", "rope_theta", "init_std"):
    _positive(f"model.{name}", m[name])
  check_range("model.head_dim", m.head_dim, lo=0, note="0 = d_model // n_heads")
  if m.head_dim == 0 and m.d_model % m.n_heads:
    raise ValueError(
        f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
        "pick n_heads dividing d_model or set model.head_dim explicitly")
  if m.n_heads % m.n_kv_heads:
    raise ValueError(
        f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
        "GQA needs n_heads to be a multiple of n_kv_heads (n_kv_heads=1 is MQA)")
  if head_dim(m) % 2:
    raise ValueError(f"head dim {head_dim(m)} must be even for RoPE")
  if m.attention == "cudnn":  # what cuDNN's fused attention takes
    if m.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"model.attention='cudnn' computes in bfloat16 or float16; "
                       f"model.dtype={m.dtype!r}")
    width = attention_width(m)
    if width % 8 or width > 256:
      raise ValueError(f"model.attention='cudnn' takes head dims that are multiples of 8 up "
                       f"to 256; this model's is {width}")
  if m.rope_scaling.type != "none":
    r = m.rope_scaling
    check_range("model.rope_scaling.factor", r.factor, lo=1)
    _positive("model.rope_scaling.original_max_position", r.original_max_position)
    if r.type == "llama3":
      _positive("model.rope_scaling.low_freq_factor", r.low_freq_factor)
      check_range("model.rope_scaling.high_freq_factor", r.high_freq_factor,
                  lo=r.low_freq_factor, lo_open=True, note="must exceed low_freq_factor")
    if r.type == "yarn":
      _positive("model.rope_scaling.beta_slow", r.beta_slow)
      check_range("model.rope_scaling.beta_fast", r.beta_fast, lo=r.beta_slow, lo_open=True,
                  note="must exceed beta_slow")
      for name in ("mscale", "mscale_all_dim", "attention_factor"):
        check_range(f"model.rope_scaling.{name}", r[name], lo=0, note="0 = derived")
  if m.rope_scaling.type == "dynamic" and head_dim(m) <= 2:
    raise ValueError("model.rope_scaling.type='dynamic' needs a head dim above 2")
  for name in ("flash_block_q", "flash_block_k", "sliding_window", "sliding_window_pattern"):
    check_range(f"model.{name}", m[name], lo=0, note="0 = default / off")
  for name in ("rope_local_theta", "attn_logit_softcap", "final_logit_softcap",
               "query_pre_attn_scalar"):
    check_range(f"model.{name}", m[name], lo=0, note="0 = off / default")
  if t.quantization != "none" and (m.lora.rank or m.weight_quant != "none"):
    raise ValueError(f"train.quantization={t.quantization!r} quantizes full training; with "
                     "LoRA (model.lora.rank > 0) use QLoRA's model.lora.base_quant, and a "
                     "model.weight_quant workdir is for serving")
  check_range("model.pipeline_repeats", m.pipeline_repeats, lo=1)
  check_range("train.pipeline_microbatches", t.pipeline_microbatches, lo=0,
              note="0 = one per pipeline stage")
  check_range("model.mtp_layers", m.mtp_layers, lo=0, note="0 = off")
  check_range("model.mtp_loss_weight", m.mtp_loss_weight, lo=0)
  if m.mtp_layers and m.head != "lm":
    raise ValueError(f"model.mtp_layers={m.mtp_layers} predicts tokens: it needs "
                     f"model.head='lm', not {m.head!r}")
  if m.mla.kv_lora_rank:
    ml = m.mla
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      _positive(f"model.mla.{name}", ml[name])
    check_range("model.mla.q_lora_rank", ml.q_lora_rank, lo=0, note="0 = one q projection")
    if ml.qk_rope_head_dim % 2:
      raise ValueError(f"model.mla.qk_rope_head_dim={ml.qk_rope_head_dim} must be even for RoPE")
    unsupported = [f"{k}={v!r}" for k, v in (
        ("model.sliding_window", m.sliding_window), ("model.qk_norm", m.qk_norm),
        ("model.qkv_bias", m.qkv_bias), ("model.attn_logit_softcap", m.attn_logit_softcap),
        ("model.query_pre_attn_scalar", m.query_pre_attn_scalar),
        ("model.lora.rank", m.lora.rank), ("model.weight_quant", m.weight_quant),
        ("model.kv_quant", m.kv_quant), ("model.out_major_kernels", m.out_major_kernels)) if v
        and v != "none"]
    if unsupported:
      raise ValueError(f"model.mla (latent attention) does not take {', '.join(unsupported)}")
  elif m.mla.q_lora_rank:
    raise ValueError(f"model.mla.q_lora_rank={m.mla.q_lora_rank} without model.mla.kv_lora_rank: "
                     "MLA is on when kv_lora_rank > 0")
  if (m.sliding_window_pattern or m.rope_local_theta) and not m.sliding_window:
    raise ValueError(f"model.sliding_window_pattern={m.sliding_window_pattern} / "
                     f"model.rope_local_theta={m.rope_local_theta} describe local "
                     "(sliding-window) layers, but model.sliding_window=0")
  registry(OBJECTIVE_CHECKS)(config)  # its data, its head, its own settings
  if m.out_major_kernels and m.lora.rank:
    raise ValueError("model.out_major_kernels with model.lora.rank > 0: LoRA and QLoRA keep "
                     "[in, out] kernels; merge the adapters first (llm.model.lora)")
  _check_unused_sections(config)
  if m.weight_quant != "none" and m.lora.rank:
    raise ValueError(f"model.weight_quant={m.weight_quant!r} with model.lora.rank > 0: a LoRA "
                     "run's frozen base is quantized by model.lora.base_quant (QLoRA)")
  if m.lora.base_quant != "none" and not m.lora.rank:
    raise ValueError(f"model.lora.base_quant={m.lora.base_quant!r} quantizes the frozen base "
                     "of a LoRA run: set model.lora.rank > 0")
  if m.lora.rank:
    check_range("model.lora.rank", m.lora.rank, lo=1)
    check_range("model.lora.alpha", m.lora.alpha, lo=0, lo_open=True)
    check_range("model.lora.dropout", m.lora.dropout, lo=0, hi=1, hi_open=True)
    targets = comma_list(m.lora.targets)
    allowed = registry(LORA_TARGETS_REGISTRY)
    if not targets or any(t not in allowed for t in targets):
      raise ValueError(f"model.lora.targets={m.lora.targets!r}: allowed targets are "
                       f"{list(allowed)} (comma-separated)")
    if m.mlp == "moe" and set(targets) & {"gate", "up", "down"}:
      raise ValueError(f"model.lora.targets={m.lora.targets!r}: LoRA does not adapt MoE "
                       "experts; with model.mlp='moe' choose among q, k, v, o")
  if m.mlp == "moe":
    e = m.moe
    check_range("model.moe.n_experts", e.n_experts, lo=1)
    check_range("model.moe.top_k", e.top_k, lo=1, hi=e.n_experts, note="at most n_experts")
    check_range("model.moe.d_ff", e.d_ff, lo=0, note="0 = model.d_ff")
    check_range("model.moe.n_shared", e.n_shared, lo=0)
    check_range("model.moe.load_balance_weight", e.load_balance_weight, lo=0)
    check_range("model.moe.router_z_weight", e.router_z_weight, lo=0)
    check_range("model.moe.capacity_factor", e.capacity_factor, lo=0, lo_open=True)
    check_range("model.moe.every", e.every, lo=1, hi=m.n_layers, note="at most model.n_layers")
    check_range("model.moe.first_dense", e.first_dense, lo=0, hi=m.n_layers - 1,
                note="dense layers before the MoE ones")
    check_range("model.moe.n_groups", e.n_groups, lo=1)
    if e.n_experts % e.n_groups:
      raise ValueError(f"model.moe.n_groups={e.n_groups} does not divide model.moe.n_experts="
                       f"{e.n_experts} (experts are split into equal groups)")
    check_range("model.moe.topk_groups", e.topk_groups, lo=1, hi=e.n_groups,
                note="at most n_groups")
    if e.n_groups > 1 and e.top_k > e.topk_groups * (e.n_experts // e.n_groups):
      raise ValueError(f"model.moe.top_k={e.top_k} exceeds the {e.topk_groups} x "
                       f"{e.n_experts // e.n_groups} experts of the chosen groups")
    check_range("model.moe.routed_scaling", e.routed_scaling, lo=0, lo_open=True)
    check_range("model.moe.routed_bias_update_rate", e.routed_bias_update_rate, lo=0,
                note="0 = no balancing bias")
    if e.routed_bias_update_rate and e.router != "sigmoid":
      raise ValueError("model.moe.routed_bias_update_rate > 0 balances a sigmoid router "
                       "(DeepSeek-V3); set model.moe.router='sigmoid'")
    if e.first_dense and (e.every > 1 or m.sliding_window_pattern):
      raise ValueError("model.moe.first_dense with moe.every > 1 or sliding_window_pattern: "
                       "one layer pattern at a time")
  layers, group = scan_unit(m)
  if m.scan_layers and layers % group:
    raise ValueError(f"model.n_layers={m.n_layers} (less moe.first_dense) is not a multiple "
                     f"of {group}, the layers' repeating pattern (moe.every, "
                     "sliding_window_pattern), which model.scan_layers=True scans as one "
                     "unit; set model.scan_layers=False")
  if d.source in ("text", "jsonl") and not d.paths:
    raise ValueError(f"data.source={d.source!r} needs data.paths (comma-separated files or globs)")
  if d.source == "tfds" and not d.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name (e.g. 'lm1b')")
  if d.doc_separator:
    try:
      re.compile(d.doc_separator)
    except re.error as e:
      raise ValueError(f"data.doc_separator={d.doc_separator!r} is not a valid regular "
                       f"expression: {e}") from None
  try:
    codecs.lookup(d.encoding)
  except LookupError:
    raise ValueError(f"data.encoding={d.encoding!r} is not a text encoding Python knows "
                     "(e.g. 'utf-8', 'latin-1', 'cp1252')") from None
  _choice("data.encoding_errors", d.encoding_errors, ("strict", "replace"))
  _positive("data.seq_len", d.seq_len)
  check_range("data.val_fraction", d.val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
  _positive("data.tokenizer_max_chars", d.tokenizer_max_chars)
  check_range("data.shuffle_seed", d.shuffle_seed, lo=0)
  _check_store(config)
  for name in ("batch_size", "grad_accum", "steps", "log_every", "eval_every",
               "eval_batches", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips"):
    _positive(f"train.{name}", t[name])
  check_range("train.z_loss", t.z_loss, lo=0, note="0 = off")
  check_range("train.loss_chunk", t.loss_chunk, lo=0,
              note="positions per row in each chunk of the fused head + loss; 0 = one chunk")
  _choice("train.wandb_mode", t.wandb_mode, ("", "online", "offline", "disabled"))
  check_range("train.peak_flops_per_device", t.peak_flops_per_device, lo=0,
              note="0 = look it up or measure it")
  if t.batch_size % t.grad_accum:
    raise ValueError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  _positive("optim.lr", o.lr)
  if o.warmup_steps < 0 or o.warmup_steps > t.steps:
    raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}]")
  check_range("optim.min_lr_ratio", o.min_lr_ratio, lo=0, hi=1,
              note="the final learning rate as a fraction of optim.lr")
  check_range("optim.decay_fraction", o.decay_fraction, lo=0, hi=1, lo_open=True)
  check_range("optim.b1", o.b1, lo=0, hi=1, hi_open=True)
  check_range("optim.b2", o.b2, lo=0, hi=1, hi_open=True)
  check_range("optim.eps", o.eps, lo=0, lo_open=True, note="Adam's denominator guard")
  check_range("optim.weight_decay", o.weight_decay, lo=0)
  check_range("optim.clip_norm", o.clip_norm, lo=0, note="0 = no clipping")
  dist = config.distributed
  check_range("distributed.num_processes", dist.num_processes, lo=0)
  check_range("distributed.process_id", dist.process_id, lo=-1)
  mesh_axes = registry(MESH_AXES_REGISTRY)
  unknown = set(config.mesh.keys()) - set(mesh_axes)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {list(mesh_axes)}")
  for axis in mesh_axes:
    size = config.mesh[axis]
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size} must be a positive size or -1 (fill in)")
  if sum(config.mesh[a] == -1 for a in mesh_axes) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {config.mesh.to_dict()}")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  base = base_config()
  base.update(json.loads(text))  # unknown keys raise, like command-line overrides
  return base


def load_config(recipe: str, overrides: dict | None = None,
                check: bool = True) -> ml_collections.ConfigDict:
  """A recipe's config with dotted-key overrides, validated: `recipe` is a config file's
  path or the name of one in the repository's configs/ ("tiny"), and `overrides` maps
  e.g. "train.steps" to a value, as `--config.train.steps=...` does on the command line."""
  path = Path(recipe)
  if path.suffix != ".py":
    path = Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.py"
  if not path.is_file():
    raise FileNotFoundError(f"no config file {str(path)!r} (give a path to a .py config or a "
                            "recipe name from configs/)")
  root = str(path.resolve().parents[1])  # recipes import each other as configs.NAME
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"llm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in (overrides or {}).items():
    section, _, name = key.rpartition(".")
    try:
      node = _get(config, section) if section else config
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise KeyError(key)
      node[name] = value
    except KeyError:
      raise ValueError(f"the config has no field {key!r}") from None
    except TypeError as e:
      raise ValueError(f"cannot set {key}={value!r}: {e}") from None
  if check:
    validate(config)
  return config
