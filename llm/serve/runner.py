"""The engine's model step: one jitted program over a flat, ragged batch of tokens from
many sequences, reading and writing K/V through page tables, then sampling one token for
each sequence that reached its end, with the sequence's own settings and key.

Shapes are static per token bucket: the batch's tokens are padded up to the smallest
bucket that holds them (padding tokens belong to no sequence and write into the reserved
page 0), rows up to `max_num_seqs`, page tables to `max_model_len` worth of pages. Each
row's tokens are contiguous and rows are in order: the attention's layout
(llm.ops.attention.paged). So there is one compile per bucket, all done by `warm_up`
before traffic. The attention masks come from runtime positions, never from constants
XLA could fold.

The model runs unrolled (layers_0, ...) with one page pool per layer, donated and
updated in place (a scan would slice and restack the whole pool every step). Its kernels
stay in-major even on a CPU, unlike the static decoder's (llm.inference): for the engine's
many-row batches that is the faster layout (a 16-row decode step 86 -> 73 ms, 125M).
"""

from __future__ import annotations

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from llm.config import kv_cache_vectors
from llm.inference.sampling import sample_rows
from llm.model import make_model, quant, require_lm_head
from llm.model.transformer import head_logits, init_params, unstack_layers
from llm.parallel.mesh import use_mesh
from llm.ops.attention.dispatch import kv_pages_spec
from llm.parallel.rules import logical_to_sharding
from llm.serve.lora import apply_with_adapters

# per-row sampling arrays the step takes, with their dtypes
ROW_FIELDS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
              "min_p": np.float32, "repetition": np.float32, "presence": np.float32,
              "frequency": np.float32, "seed": np.uint32, "draw": np.int32,
              "sample_index": np.int32, "top_logprobs": np.int32, "scaled_logprobs": np.int32}
ROW_DEFAULTS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition": 1.0,
                "presence": 0.0, "frequency": 0.0, "seed": 0, "draw": 0, "sample_index": 0,
                "top_logprobs": 0, "scaled_logprobs": 0}


def sample_head(params, model_cfg, x_TD, rows):
  """One token per sampling row from the hidden state at its `sample_index`."""
  h_SD = x_TD[rows["sample_index"]]
  logits_SV = head_logits(params, model_cfg, h_SD)
  keys_S = jax.vmap(lambda s, d: jax.random.fold_in(jax.random.key(s), d))(rows["seed"],
                                                                          rows["draw"])
  return sample_rows(keys_S, logits_SV, rows)


def _step(model, model_cfg, head, params, pages, batch, rows, adapters):
  paged = {k: batch[k] for k in ("page", "slot", "kv_lens", "page_table", "cu_q_lens",
                                  "num_seqs")}

  def forward():
    return model.apply({"params": params}, batch["tokens"][None], None,
                       batch["positions"][None], pages, paged, head=False)

  if adapters:  # LoRA adapters, each token its request's (llm.serve.lora)
    x_1TD, pages = apply_with_adapters(adapters, batch["adapter"], forward)
  else:
    x_1TD, pages = forward()
  return pages, head(params, model_cfg, x_1TD[0], rows)


def _copy_pages(pages, src_N, dst_N):
  return [{k: x.at[dst_N].set(x[src_N]) for k, x in p.items()} for p in pages]


class ModelRunner:
  """Params (unstacked), the per-layer KV page pools and the jitted step per bucket."""

  def __init__(self, model_cfg, params, num_pages: int, page_size: int, max_num_seqs: int,
               max_model_len: int, buckets: tuple[int, ...], mesh=None, adapters=None,
               head=sample_head, row_fields: dict | None = None):
    """With a `mesh`, weights and KV pages are sharded by the logical-axis rules (tensor
    parallel over heads; the KV pages over kv_heads) and the step runs under it.
    `adapters` (llm.serve.lora.Adapters): LoRA adapters served over these weights.
    `head(params, model_cfg, x_TD, rows)` turns the step's hidden states into its outputs
    (default: one sampled token per row; llm.serve.speculative has the others), and
    `row_fields` ({name: (shape after the row axis, dtype, default)}) are the per-row
    inputs it reads beyond ROW_FIELDS."""
    require_lm_head(model_cfg, "serving")
    if model_cfg.rope_scaling.type == "dynamic":
      raise ValueError("model.rope_scaling.type='dynamic' rescales RoPE by each call's longest "
                       "sequence (as transformers does), which the engine's shared batches "
                       "would mix up; generate with llm.generate (the Decoder), or serve "
                       "with a static scaling (linear or yarn)")
    cfg = ml_collections.ConfigDict(ml_collections.ConfigDict(model_cfg).to_dict())
    self._stacked_cfg = ml_collections.ConfigDict(cfg.to_dict()) if cfg.scan_layers else None
    cfg.scan_layers = False
    cfg.remat = "none"  # no backward pass: rematerialisation would only cost compile time
    self.cfg = cfg
    self.page_size, self.num_pages = page_size, num_pages
    self.max_num_seqs, self.buckets = max_num_seqs, tuple(sorted(buckets))
    self.pages_per_seq = -(-max_model_len // page_size)
    # K and V heads interleaved (MLA: one latent vector, its own value)
    shape = (num_pages, page_size, *kv_cache_vectors(cfg)[:2])
    dtype = jnp.dtype(cfg.dtype)
    model = make_model(cfg)
    self.mesh = mesh
    page_sharding = self.param_shardings = None
    if mesh is not None:
      boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
      self.param_shardings = logical_to_sharding(boxed, mesh)
      page_sharding = NamedSharding(mesh, kv_pages_spec(shape, mesh))
    self._unstack = None
    if self._stacked_cfg is not None:  # one program: every layer's slices in one go
      self._unstack = jax.jit(functools.partial(unstack_layers, model_cfg=self._stacked_cfg),
                              out_shardings=self.param_shardings)
    self.params = None
    self.set_params(params)
    self.pages = [self._empty_pages(shape, dtype, page_sharding) for _ in range(cfg.n_layers)]
    self.row_fields = row_fields or {}
    self._step = jax.jit(functools.partial(_step, model, cfg, head), donate_argnums=(1,))
    self._copy = jax.jit(_copy_pages, donate_argnums=(0,))
    self.compile_seconds: dict[int, float] = {}
    self.adapters = adapters.stacked if adapters is not None else {}
    self._zeros_SV = None

  def _empty_pages(self, shape, dtype, sharding) -> dict:
    """One layer's page pool: {"kv"}, or int8 {"kv", "kv_scale"} (model.kv_quant)."""
    if self.cfg.kv_quant == "none":
      return {"kv": jnp.zeros(shape, dtype, device=sharding)}
    scale_sharding = None
    if sharding is not None:
      scale_sharding = NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:3]))
    return {"kv": jnp.zeros(shape, jnp.int8, device=sharding),
            "kv_scale": jnp.zeros(shape[:3], jnp.float32, device=scale_sharding)}

  def set_params(self, params) -> None:
    """Weights for the next steps, the caller's own arrays where their layout is this
    runner's: nothing is copied for an unscanned model whose arrays are already sharded
    as the mesh's rules shard them (a trainer's, on the same mesh). A scanned model's
    layers are sliced out of their stack, one copy of the layer weights per call; arrays
    laid out otherwise are moved. None drops the runner's hold on the weights."""
    if params is not None:
      if self._unstack is not None:
        params = self._unstack(params)
      elif self.param_shardings is not None:
        params = jax.tree.map(
            lambda x, s: x if getattr(x, "sharding", None) is not None
            and x.sharding.is_equivalent_to(s, x.ndim) else jax.device_put(x, s),
            params, self.param_shardings)
    self.params = params

  @staticmethod
  def kv_bytes_per_page(model_cfg, page_size: int) -> int:
    return page_size * quant.kv_bytes_per_token(model_cfg)

  def bucket(self, n_tokens: int) -> int:
    for b in self.buckets:
      if n_tokens <= b:
        return b
    raise ValueError(f"{n_tokens} tokens exceed the largest bucket {self.buckets[-1]}")

  def empty_inputs(self, t_bucket: int):
    """Empty (all padding) step inputs of one bucket, host arrays."""
    s = self.max_num_seqs
    batch = {"tokens": np.zeros(t_bucket, np.int32), "positions": np.full(t_bucket, -1, np.int32),
             "page": np.zeros(t_bucket, np.int32), "slot": np.zeros(t_bucket, np.int32),
             "kv_lens": np.zeros(s, np.int32), "cu_q_lens": np.zeros(s + 1, np.int32),
             "num_seqs": np.zeros(1, np.int32), "adapter": np.zeros(t_bucket, np.int32),
             "page_table": np.zeros((s, self.pages_per_seq), np.int32)}
    rows = {k: np.full(s, ROW_DEFAULTS[k], dtype) for k, dtype in ROW_FIELDS.items()}
    for k, (shape, dtype, default) in self.row_fields.items():
      rows[k] = np.full((s, *shape), default, dtype)
    return batch, rows

  def warm_up(self) -> dict[int, float]:
    """Compiles the step for every bucket (seconds per bucket)."""
    for b in self.buckets:
      batch, rows = self.empty_inputs(b)
      t0 = time.perf_counter()
      self.run(batch, rows)
      self.compile_seconds[b] = time.perf_counter() - t0
    return self.compile_seconds

  def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
    """Copies each (source, destination) page's K/V, every layer, in one program (pairs
    padded to max_num_seqs with page 0 onto itself: one compile)."""
    for start in range(0, len(pairs), self.max_num_seqs):
      chunk = pairs[start:start + self.max_num_seqs]
      src, dst = np.zeros((2, self.max_num_seqs), np.int32)
      src[:len(chunk)], dst[:len(chunk)] = zip(*chunk)
      with contextlib.ExitStack() as stack:
        if self.mesh is not None:
          stack.enter_context(use_mesh(self.mesh))
        self.pages = self._copy(self.pages, jnp.asarray(src), jnp.asarray(dst))

  def run(self, batch: dict, rows: dict, counts_SV=None, seen_SV=None, allowed_SV=None):
    """One step; returns the head's outputs as host arrays (by default: tokens, logprobs,
    top logprobs, top ids [S, ...]). counts / seen (penalties) and allowed (grammars):
    [S, V], None when no row uses them."""
    return jax.device_get(self.run_on_device(batch, rows, counts_SV, seen_SV, allowed_SV))

  def run_on_device(self, batch: dict, rows: dict, counts_SV=None, seen_SV=None,
                    allowed_SV=None):
    """`run`, its outputs left on the device (rows may hold device arrays too)."""
    if self._zeros_SV is None:
      shape = (self.max_num_seqs, self.cfg.vocab_size)
      self._zeros_SV = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool),
                        jnp.ones(shape, bool))
    zero_counts, no_seen, all_allowed = self._zeros_SV
    rows = {**{k: jnp.asarray(v) for k, v in rows.items()},
            "counts": zero_counts if counts_SV is None else counts_SV,
            "seen": no_seen if seen_SV is None else seen_SV,
            "allowed": all_allowed if allowed_SV is None else allowed_SV}
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:
        stack.enter_context(use_mesh(self.mesh))
      self.pages, out = self._step(self.params, self.pages,
                                   {k: jnp.asarray(v) for k, v in batch.items()}, rows,
                                   self.adapters)
    return out
