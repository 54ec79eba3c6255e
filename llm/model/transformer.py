"""The Llama-family decoder: embed -> N x (attention + MLP) blocks -> norm -> logits.

Layers are stacked with `nn.scan` (one compiled block, a leading "layers"
param axis) and rematerialised by a named policy (REMAT_POLICIES). The MLP is the
kind `config.model.mlp` names (llm.model.mlp.MLPS). With `mlp="moe"` and
`moe.every=n > 1` only every n-th layer is MoE (layers n-1, 2n-1, ...; Qwen3's
`decoder_sparse_step`) and the others dense: the scanned unit is then a group of n
blocks named block_0 .. block_{n-1}, so params["layers"]["block_j"] holds layers
j, n+j, 2n+j, ... `forward` applies the model and collects the auxiliary losses and
metrics its layers sowed.
"""

from __future__ import annotations

import functools
import json
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from llm.config import head_dim, scan_unit
from llm.model.attention import Attention, LatentAttention
from llm.model.layers import (AUX_LOSSES, AUX_METRICS, AUX_UPDATES, Projection, add_aux_loss,
                              constrain, norm, param_with_axes)
from llm.model.mlp import MLPS
from llm.ops.cross_entropy import chunked_token_nll
from llm.ops.softcap import soft_cap
from llm.parallel import pipeline

# config.model.head -> what the model maps the final hidden states to: "lm", next-token
# logits [B, T, V]; "score", one scalar per position [B, T] (a reward model: the score of a
# sequence is the one at its last token; HF's *ForSequenceClassification with one label)
HEADS = ("lm", "score")


def require_lm_head(model_cfg, what: str) -> None:
  """Refuses a reward model (model.head="score") where next-token logits are needed."""
  if model_cfg.head != "lm":
    raise ValueError(f"{what} needs a language model, but this is a reward model "
                     f"(model.head={model_cfg.head!r}); score conversations with "
                     "llm.eval.scorer.RewardScorer")

# config.model.remat -> what the backward pass may keep from the forward (None: all of it),
# in order of increasing recomputation; "offload" recomputes like "full" and moves each
# layer's input (the one activation "full" keeps per layer) to host memory until the
# backward pass needs it again.
LAYER_INPUT = "layer_input"
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}


def dtypes(cfg):
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


class LayerKind(NamedTuple):
  mlp: str  # MLPS kind
  local: bool  # attends within model.sliding_window (with model.rope_local_theta's RoPE)


def first_dense(cfg) -> int:
  """Layers 0 .. n-1 that are dense before the pattern starts (moe.first_dense); scanned
  as their own stack, params["dense_layers"]."""
  return cfg.moe.first_dense if cfg.mlp == "moe" else 0


def layer_kinds(cfg) -> tuple[LayerKind, ...]:
  """The kind of each block in the scanned unit: one block unless layers repeat a
  pattern (moe.every > 1: every n-th MoE; sliding_window_pattern: every n-th global),
  whose length is the unit's. The pattern starts after first_dense(cfg) dense layers."""
  every = cfg.moe.every if cfg.mlp == "moe" else 1
  pattern = cfg.sliding_window_pattern
  n = scan_unit(cfg)[1]
  return tuple(LayerKind(cfg.mlp if (j + 1) % every == 0 else "dense",
                         bool(cfg.sliding_window) and (not pattern or (j + 1) % pattern != 0))
               for j in range(n))


def layer_kind(cfg, layer: int) -> LayerKind:
  kinds = layer_kinds(cfg)
  if layer < first_dense(cfg):
    return kinds[0]._replace(mlp="dense")
  return kinds[(layer - first_dense(cfg)) % len(kinds)]


def _rematted(cfg, unit, prevent_cse: bool):
  """`unit` under model.remat's policy (REMAT_POLICIES; "none": the unit itself)."""
  policy = REMAT_POLICIES[cfg.remat]
  return unit if policy is None else nn.remat(unit, policy=policy, prevent_cse=prevent_cse)


class Block(nn.Module):
  cfg: object
  kind: LayerKind | None = None  # None: layer_kinds(cfg)[0]

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, decode=None):
    c = self.cfg
    kind = self.kind or layer_kinds(c)[0]
    dtype, param_dtype = dtypes(c)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.n_layers)
    x_BTD = checkpoint_name(x_BTD, LAYER_INPUT)
    h_BTD = norm(c, "attn_norm", **kw)(x_BTD)
    if c.mla.kv_lora_rank:
      attention = LatentAttention(c, out_init_std=out_std, name="attn", **kw)
    else:
      attention = Attention(c, head_dim(c), local=kind.local, out_init_std=out_std,
                            name="attn", **kw)
    attn_BTD, cache = attention(h_BTD, segment_ids_BT, positions_BT, cache, decode)
    if c.post_norms:
      attn_BTD = norm(c, "attn_post_norm", **kw)(attn_BTD)
    x_BTD = x_BTD + attn_BTD
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
    h_BTD = norm(c, "mlp_norm", **kw)(x_BTD)
    mlp_BTD = MLPS[kind.mlp](c, out_init_std=out_std, name="mlp")(h_BTD)
    if c.post_norms:
      mlp_BTD = norm(c, "mlp_post_norm", **kw)(mlp_BTD)
    x_BTD = constrain(x_BTD + mlp_BTD, ("batch", "length", "act_embed"))
    return x_BTD, cache


class Group(nn.Module):
  """Consecutive blocks of the kinds `layer_kinds` names, scanned as one unit; the
  cache's leading axis runs over the group's blocks."""
  cfg: object

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache=None, decode=None):
    caches = []
    for j, kind in enumerate(layer_kinds(self.cfg)):
      block_cache = None if cache is None else jax.tree.map(lambda a: a[j], cache)
      x_BTD, block_cache = Block(self.cfg, kind, name=f"block_{j}")(
          x_BTD, segment_ids_BT, positions_BT, block_cache, decode)
      caches.append(block_cache)
    if cache is not None:
      cache = jax.tree.map(lambda *a: jnp.stack(a), *caches)
    return x_BTD, cache


MTP_CHUNK = 256  # positions per row in each chunk of the MTP heads' cross-entropy


class MultiTokenPrediction(nn.Module):
  """DeepSeek-V3's multi-token prediction, a training-only head (model.mtp_layers = D).
  Module k (1..D) combines, at position i, the previous depth's hidden state (the
  trunk's, before its final norm, for k = 1) with the embedding of token i+k:
  h = proj([norm(h); norm(emb(t[i+k]))]), runs one decoder block on it and predicts token
  i+k+1 through the shared head (after its own norm). Its cross-entropy, averaged over
  the positions whose target lies in the same packed document, x mtp_loss_weight / D,
  is handed to the objective as the auxiliary loss `mtp_loss` (all positions of the
  rows: the objective's loss mask does not reach it). Decoding never runs it."""
  cfg: object

  @nn.compact
  def __call__(self, h_BTD, tokens_BT, segment_ids_BT, positions_BT, embedding_VD, unembed_DV):
    c = self.cfg
    dtype, param_dtype = dtypes(c)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    t = tokens_BT.shape[1]

    def ahead(a_BT, n, fill=0):  # a[:, i + n], past the end: fill
      return jnp.pad(a_BT[:, n:], ((0, 0), (0, n)), constant_values=fill)

    losses = []
    for k in range(1, c.mtp_layers + 1):
      next_BTD = jnp.take(embedding_VD, ahead(tokens_BT, k), axis=0).astype(dtype)
      both_BT2D = jnp.stack([norm(c, f"hidden_norm_{k}", **kw)(h_BTD),
                             norm(c, f"embed_norm_{k}", **kw)(next_BTD)], axis=2)
      h_BTD = Projection((2, c.d_model), (c.d_model,), (None, "embed", "act_embed"),
                         init_std=c.init_std, name=f"proj_{k}", **kw)(both_BT2D)
      h_BTD, _ = Block(c, layer_kind(c, c.n_layers - 1), name=f"block_{k}")(
          h_BTD, segment_ids_BT, positions_BT)
      target_BT = ahead(tokens_BT, k + 1)
      valid_BT = ((ahead(segment_ids_BT, k + 1, -1) == segment_ids_BT) & (segment_ids_BT > 0)
                  & (jnp.arange(t) < t - k - 1)).astype(jnp.float32)
      nll_BT, _ = chunked_token_nll(norm(c, f"head_norm_{k}", **kw)(h_BTD),
                                    unembed_DV.astype(dtype), target_BT,
                                    chunk_len=min(MTP_CHUNK, t),
                                    softcap=c.final_logit_softcap)
      losses.append(jnp.sum(nll_BT * valid_BT) / jnp.maximum(jnp.sum(valid_BT), 1.0))
    add_aux_loss(self, "mtp_loss", c.mtp_loss_weight * sum(losses) / len(losses))


class Transformer(nn.Module):
  """Maps tokens [B, T] (with segment ids and positions) to fp32 logits [B, T, V] (with
  model.head="score": fp32 scores [B, T] from a bias-free [D, 1] "score" projection).

  For decoding, `cache` holds {"k", "v"} of shape [L, B, K, S, E] (or, unrolled, a list
  of per-layer {"k", "v"} of [B, K, S, E]) and `decode` holds
  {"slot": first cache slot of these tokens, "kv_valid": [B, S] bool}; the call then
  returns (logits, updated cache). `last_only` computes the head at the last position
  only (logits [B, 1, V]): a prefill needs no more, and skips a [B*T, D] x [D, V] matmul.
  `head=False` returns the final-normed hidden states [B, T, D] in the compute dtype
  instead, for a loss that applies the head itself (`unembedding`; llm.ops.cross_entropy).
  """
  cfg: object
  # on a mesh with a pipeline axis: the microbatches each step's batch is cut into
  # (train.pipeline_microbatches; 0: one per stage)
  pipeline_microbatches: int = 0

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, cache=None, decode=None,
               last_only: bool = False, head: bool = True):
    c = self.cfg
    dtype, param_dtype = dtypes(c)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embedding_VD = param_with_axes(self, "embedding", nn.initializers.normal(c.init_std),
                                   (c.vocab_size, c.d_model), ("vocab", "embed"), param_dtype)
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(dtype)
    if c.embed_scale:  # Gemma: x sqrt(d_model), rounded to the compute dtype first
      x_BTD = x_BTD * jnp.asarray(math.sqrt(c.d_model), dtype)
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))

    group = len(layer_kinds(c))
    unit = _rematted(c, Block if group == 1 else Group, prevent_cse=not c.scan_layers)
    if c.scan_layers:
      def scanned(unit, length):
        return nn.scan(unit, variable_axes={"params": 0, AUX_LOSSES: 0, AUX_METRICS: 0,
                                            AUX_UPDATES: 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                       length=length, metadata_params={nn.PARTITION_NAME: "layers"})

      k = first_dense(c)
      prefix_cache = None
      if k:  # the dense layers before the pattern: their own stack
        prefix_cache = None if cache is None else jax.tree.map(lambda a: a[:k], cache)
        cache = None if cache is None else jax.tree.map(lambda a: a[k:], cache)
        x_BTD, prefix_cache = scanned(_rematted(c, Block, prevent_cse=False), k)(
            c, layer_kind(c, 0), name="dense_layers")(
            x_BTD, segment_ids_BT, positions_BT, prefix_cache, decode)
      if cache is not None and group > 1:  # [L, ...] -> [L / n, n, ...]
        cache = jax.tree.map(lambda a: a.reshape(-1, group, *a.shape[1:]), cache)
      n_stages = pipeline.stages(jax.sharding.get_abstract_mesh())
      if n_stages > 1 and not self.is_initializing():
        chunk = (c.n_layers - k) // group // (n_stages * c.pipeline_repeats)  # units per chunk
        x_BTD = self._pipelined(scanned(unit, chunk), x_BTD, segment_ids_BT, positions_BT,
                                cache, n_stages)
      else:
        x_BTD, cache = scanned(unit, (c.n_layers - k) // group)(c, name="layers")(
            x_BTD, segment_ids_BT, positions_BT, cache, decode)
      if cache is not None and group > 1:
        cache = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), cache)
      if prefix_cache is not None:
        cache = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), prefix_cache, cache)
    else:  # the cache: stacked [L, ...], or a list of per-layer caches (updated in place)
      per_layer = isinstance(cache, (list, tuple))
      layer_caches = []
      for i in range(c.n_layers):
        layer_cache = (None if cache is None else cache[i] if per_layer else
                       jax.tree.map(lambda a: a[i], cache))
        x_BTD, layer_cache = _rematted(c, Block, prevent_cse=True)(
            c, layer_kind(c, i), name=f"layers_{i}")(
            x_BTD, segment_ids_BT, positions_BT, layer_cache, decode)
        layer_caches.append(layer_cache)
      if cache is not None:
        cache = layer_caches if per_layer else jax.tree.map(lambda *a: jnp.stack(a), *layer_caches)

    unembed_DV = None
    if c.head == "lm":
      unembed_DV = embedding_VD.T if c.tie_embeddings else param_with_axes(
          self, "unembed", nn.initializers.normal(c.init_std), (c.d_model, c.vocab_size),
          ("embed", "vocab"), param_dtype)
    if c.mtp_layers and cache is None and not last_only:
      MultiTokenPrediction(c, name="mtp")(x_BTD, tokens_BT, segment_ids_BT, positions_BT,
                                          embedding_VD, unembed_DV)
    if last_only:
      x_BTD = x_BTD[:, -1:]
    x_BTD = norm(c, "final_norm", dtype=dtype, param_dtype=param_dtype)(x_BTD)
    if not head:
      return x_BTD if cache is None else (x_BTD, cache)
    if c.head == "score":
      score_D1 = param_with_axes(self, "score", nn.initializers.normal(c.init_std),
                                 (c.d_model, 1), ("embed", None), param_dtype)
      scores_BT = jnp.dot(x_BTD, score_D1.astype(dtype), preferred_element_type=jnp.float32)[..., 0]
      scores_BT = constrain(scores_BT, ("batch", "length"))
      return scores_BT if cache is None else (scores_BT, cache)
    logits_BTV = jnp.dot(x_BTD, unembed_DV.astype(dtype), preferred_element_type=jnp.float32)
    logits_BTV = soft_cap(logits_BTV, c.final_logit_softcap)
    logits_BTV = constrain(logits_BTV, ("batch", "length", "act_vocab"))
    return logits_BTV if cache is None else (logits_BTV, cache)


  def _pipelined(self, chunk_stack, x_BTD, segment_ids_BT, positions_BT, cache, n_stages):
    """The scanned layers through the pipeline (llm.parallel.pipeline): each stage runs
    chunks of the scanned unit, `chunk_stack` applied to its slice of params["layers"].
    What the layers sow comes back per layer and is sown here as the scanned stack would
    sow it: auxiliary losses and metrics averaged over the microbatches, corrections
    summed (as train.grad_accum over the same rows gives them)."""
    if cache is not None:
      raise ValueError("decoding runs without a pipeline: load the model on a mesh with "
                       "mesh.pipeline=1 (llm.generate and the engine do)")
    c = self.cfg
    key = self.make_rng("dropout") if self.has_rng("dropout") else None
    collections = [AUX_LOSSES, AUX_METRICS, AUX_UPDATES]
    microbatches = pipeline.microbatch_count(self.pipeline_microbatches, n_stages)

    def stage_fn(params_k, x, seg, pos, step_key):
      (out, _), sown = chunk_stack(c, parent=None).apply(
          {"params": params_k}, x, seg, pos, None, None, mutable=collections,
          rngs=None if step_key is None else {"dropout": step_key})
      return out, sown

    x_BTD, sown = pipeline.run(stage_fn, self.variables["params"]["layers"], x_BTD,
                               segment_ids_BT, positions_BT,
                               mesh=jax.sharding.get_abstract_mesh(),
                               repeats=c.pipeline_repeats, microbatches=microbatches, rng=key)
    for collection, tree in sown.items():
      if self.is_mutable_collection(collection):
        if collection != AUX_UPDATES:
          tree = jax.tree.map(lambda a: a / microbatches, tree)
        self.put_variable(collection, "layers", tree)
    return x_BTD


def unembedding(params, model_cfg) -> jax.Array:
  """The LM head [D, V] in the compute dtype, as the model applies it (tied: the
  embedding's transpose)."""
  require_lm_head(model_cfg, "the language-model head")
  w_DV = params["embedding"].T if model_cfg.tie_embeddings else params["unembed"]
  return w_DV.astype(dtypes(model_cfg)[0])


def head_logits(params, model_cfg, x_SD) -> jax.Array:
  """fp32 logits [..., V] of final hidden states [..., D], as the model computes them
  (soft-capped with model.final_logit_softcap)."""
  logits = jnp.einsum("...d,dv->...v", x_SD, unembedding(params, model_cfg),
                      preferred_element_type=jnp.float32)
  return soft_cap(logits, model_cfg.final_logit_softcap)


def make_model(model_cfg, pipeline_microbatches: int = 0) -> Transformer:
  return Transformer(ml_collections.FrozenConfigDict(model_cfg), pipeline_microbatches)


def unstack_layers(params, model_cfg) -> dict:
  """Params of a scanned model (layers stacked on a leading axis, one entry per block of
  the scanned unit) as those of the same model with scan_layers=False (layers_0, ...)."""
  if not model_cfg.scan_layers:
    return params
  kinds = layer_kinds(model_cfg)
  k = first_dense(model_cfg)
  out = {name: v for name, v in params.items() if name not in ("layers", "dense_layers")}
  for i in range(model_cfg.n_layers):
    if i < k:
      out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["dense_layers"])
      continue
    j = i - k
    stacked = params["layers"] if len(kinds) == 1 else params["layers"][f"block_{j % len(kinds)}"]
    out[f"layers_{i}"] = jax.tree.map(lambda a, g=j // len(kinds): a[g], stacked)
  return out


def to_out_major(params, model_cfg) -> dict:
  """Params of a model as those of the same model with model.out_major_kernels: every
  projection kernel moved from [in..., out...] to [out..., in...]. Each kernel's
  permutation comes from the two layouts' logical axes (abstract inits, nothing computed)."""
  if model_cfg.out_major_kernels:
    return params
  target = ml_collections.ConfigDict(ml_collections.ConfigDict(model_cfg).to_dict())
  target.out_major_kernels = True
  axes_in, axes_out = (_logical_axes(c) for c in (model_cfg, target))

  def move(x, a, b):
    if a == b:
      return x
    if len(set(a)) != len(a):
      raise ValueError(f"cannot place a kernel with repeated logical axes {a} out-major")
    return jnp.transpose(x, [a.index(name) for name in b])

  return jax.tree.map(move, params, axes_in, axes_out)


def _logical_axes(model_cfg):
  """The logical axis names of every param of a model (None where it has none)."""
  return _logical_axes_of(json.dumps(ml_collections.ConfigDict(model_cfg).to_dict(),
                                     sort_keys=True))


@functools.lru_cache(maxsize=8)
def _logical_axes_of(model_cfg_json: str):
  model_cfg = ml_collections.ConfigDict(json.loads(model_cfg_json))
  boxed = jax.eval_shape(lambda: init_params(make_model(model_cfg), jax.random.key(0)))
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned)
                      else None, boxed, is_leaf=is_box)


def init_params(model: Transformer, rng, seq_len: int = 8):
  """Params with their logical-axis boxes (nn.LogicallyPartitioned). Initialisation traces
  the forward only for shapes, so activation constraints are off even under a mesh."""
  with nn.logical_axis_rules(()):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def unbox(boxed_params):
  """Plain arrays from logically partitioned params (flax's own unbox would also apply a
  sharding constraint, which fails on abstract values under an ambient mesh)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x,
                      boxed_params, is_leaf=is_box)


class Aux(NamedTuple):
  losses: dict  # name -> auxiliary loss summed over layers (added to the objective)
  metrics: dict  # name -> metric averaged over layers (logged only)
  updates: dict = {}  # corrections to params, mirroring the params tree (add_param_update)


def _by_name(sown, reduce) -> dict:
  values: dict = {}
  for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
    name = next(p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey))
    values.setdefault(name, []).append(jnp.ravel(value))
  return {name: reduce(jnp.concatenate(parts)) for name, parts in values.items()}


def target_nll(model: Transformer, params, batch, *, chunk_len: int, rng=None,
               temperature: float = 1.0) -> tuple[jax.Array, Aux]:
  """(-log p(target) per position [B, T] fp32, Aux) of a packed batch: the hidden states
  through the fused, chunked head + cross-entropy (llm.ops.cross_entropy). With a
  `temperature`, p is the softmax of logits / temperature (after any soft-capping)."""
  x_BTD, aux = forward(model, params, batch, rng, head=False)
  nll_BT, _ = chunked_token_nll(x_BTD, unembedding(params, model.cfg), batch["targets"],
                                chunk_len=chunk_len, softcap=model.cfg.final_logit_softcap,
                                temperature=temperature)
  return nll_BT, aux


def forward(model: Transformer, params, batch, rng=None, head: bool = True
            ) -> tuple[jax.Array, Aux]:
  """(logits_BTV, Aux) for a packed batch: what the layers sowed, by name. `rng` (training
  only) drives dropout where the model has any (LoRA dropout). `head=False`: the final
  hidden states [B, T, D] instead of the logits."""
  logits_BTV, sown = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                 batch["positions"],
                                 mutable=[AUX_LOSSES, AUX_METRICS, AUX_UPDATES],
                                 rngs=None if rng is None else {"dropout": rng}, head=head)
  updates = jax.tree.map(lambda sown_values: sown_values[0], sown.get(AUX_UPDATES, {}),
                         is_leaf=lambda x: isinstance(x, tuple))
  return logits_BTV, Aux(_by_name(sown.get(AUX_LOSSES, {}), jnp.sum),
                         _by_name(sown.get(AUX_METRICS, {}), jnp.mean), updates)
