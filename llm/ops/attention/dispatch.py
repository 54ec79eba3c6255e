"""Attention placed on the mesh: the implementations `config.model.attention` names, run
per shard with shard_map, and ring attention when the sequence is sharded.

Model code calls `attend(...)` with [B, T, H, E] activations and knows nothing of the
mesh. Here the ambient mesh (`llm.parallel.mesh.use_mesh`) and the logical-axis rules
decide how q/k/v are split:
  - "xla" with no sequence sharding: plain XLA attention, partitioned by GSPMD.
  - "flash": the Pallas kernel inside shard_map over batch and heads (a custom call
    cannot be partitioned by GSPMD).
  - "cudnn" (a CUDA GPU): cuDNN's fused attention the same way, where it can express the
    mask (causal, segments, window); soft-capping takes the flash kernel.
  - mesh.sequence > 1 (training): ring attention with the implementation's chunk
    functions.
Cached decoding comes through `attend_cached`: queries at cache slots slot.. over a KV
cache laid out heads-major ([B, K, S, E]), so that a decode step reads each head's keys
and values where they lie instead of transposing the cache. With plain XLA it attends over
the cache as it was and over this step's own keys/values as two chunks merged by their
logsumexp, so the cache update's only reader is the next step: XLA then writes the new
slots in place instead of copying every layer's cache at every token.
The serving engine's flat, ragged batches come through `attend_paged`: every token's key
and value are written into its KV page, then each token attends over its sequence's pages
(llm.ops.attention.paged; JAX's Pallas kernel on a TPU).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_kernels.flash_attention as flash
from llm.ops.attention.paged import dequantize_kv, paged_attention, quantize_kv, write_pages
from llm.ops.attention.ring import flash_blocks, merge, ring_attention
from llm.ops.attention.xla import Blocks, xla_attention, xla_blocks
from llm.parallel.rules import logical_to_spec

SEQUENCE_AXIS = "sequence"
TPU_QUERIES_PER_BLOCK = 32  # the paged kernel's query block
TPU_KEYS_PER_BLOCK = 512  # and the keys it reads per step (whole pages)


class Implementation(NamedTuple):
  blocks: Blocks  # chunk functions, for ring attention
  # attention over a whole (per-device) sequence, (q, k, v, seg, kv_seg, q_offset) -> out;
  # None: plain XLA, which GSPMD partitions by itself
  whole: Callable | None
  check_vma: bool  # Pallas' interpreter (CPU runs) does not track varying mesh axes


def _xla(q_len, kv_len, head_dim, window, block_q, block_k, softcap) -> Implementation:
  del q_len, kv_len, head_dim, block_q, block_k
  return Implementation(xla_blocks(window, softcap=softcap), None, True)


def _flash(q_len, kv_len, head_dim, window, block_q, block_k, softcap) -> Implementation:
  opts = flash.make_options(q_len, kv_len, head_dim, causal=True, window=window,
                            block_q=block_q, block_k=block_k, softcap=softcap)

  def whole(q, k, v, seg, kv_seg, q_offset):
    return flash.flash_attention(q, k, v, seg, kv_seg, causal=True, window=window,
                                 block_q=opts.block_q, block_k=opts.block_k,
                                 backend=opts.backend, interpret=opts.interpret,
                                 q_offset=q_offset, softcap=softcap)

  return Implementation(flash_blocks(opts), whole, False)


# jax.nn.dot_product_attention's implementation for "cudnn" (tests on a CPU set "xla",
# which runs the same call, masks and window through XLA)
CUDNN_BACKEND = "cudnn"


def _cudnn(q_len, kv_len, head_dim, window, block_q, block_k, softcap) -> Implementation:
  """cuDNN's fused flash attention (jax.nn.dot_product_attention, implementation="cudnn")
  for self-attention: causal, segments as a [B, 1, T, S] mask, the window as its
  left-only local window. What cuDNN cannot express runs elsewhere: soft-capped logits
  take the flash kernel; cached decoding (queries at an offset) the XLA path; ring
  attention's chunks are XLA's."""
  if CUDNN_BACKEND == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' runs on a CUDA GPU; JAX's backend here is "
                     f"{jax.default_backend()!r} (use 'xla', or 'flash')")
  if softcap:
    return _flash(q_len, kv_len, head_dim, window, block_q, block_k, softcap)
  if q_len != kv_len:  # queries after a cache: not self-attention
    return _xla(q_len, kv_len, head_dim, window, block_q, block_k, softcap)

  def whole(q, k, v, seg, kv_seg, q_offset):
    del q_offset  # 0: T = S only in self-attention (or a prefill filling its whole cache)
    mask_B1TS = (seg[:, :, None] == kv_seg[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask_B1TS, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=CUDNN_BACKEND)

  return Implementation(xla_blocks(window, softcap=softcap), whole, False)


# config.model.attention -> a builder of the implementation for given (local) shapes.
IMPLEMENTATIONS: dict[str, Callable[..., Implementation]] = {"xla": _xla, "flash": _flash,
                                                             "cudnn": _cudnn}


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def attend_cached(impl: str, q_BTHE, k_BTKE, v_BTKE, cache, kv_valid_BS, slot, *,
                  window: int | None = None, block_q: int | None = None,
                  block_k: int | None = None, softcap: float | None = None):
  """Queries at cache slots slot..slot+T-1 attending, causally, to the cache's filled slots
  and to this step's keys/values [B, T, K, E], which are written into the cache at `slot`.

  cache: {"k", "v"} of [B, K, S, E] (int8 with "k_scale", "v_scale" [B, K, S]: see
  llm.ops.attention.paged.quantize_kv), or {"k"} alone when keys are their own values
  (MLA's latent cache; v_BTKE is then k_BTKE); kv_valid_BS: the filled slots, this step's included
  (left-padded prompt slots are not); slot: an int32 scalar, or the Python int 0 for a
  prefill into an empty cache (then the cache is not read). Returns (out_BTHE, cache)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}; allowed: {list(IMPLEMENTATIONS)}")
  b, t = q_BTHE.shape[:2]
  quantized = "k_scale" in cache  # int8 (model.kv_quant), with a scale per token and head
  names = ("k", "v") if "v" in cache else ("k",)

  def update(cache, k_BTKE, v_BTKE):
    out = {}
    for name, new_BTKE in zip(names, (k_BTKE, v_BTKE)):
      new_BKTE = jnp.swapaxes(new_BTKE, 1, 2)
      if quantized:
        new_BKTE, scale_BKT = quantize_kv(new_BKTE)
        out[f"{name}_scale"] = jax.lax.dynamic_update_slice(cache[f"{name}_scale"], scale_BKT,
                                                            (0, 0, slot))
      out[name] = jax.lax.dynamic_update_slice(cache[name], new_BKTE.astype(cache[name].dtype),
                                               (0, 0, slot, 0))
    return out

  def read(cache, name):  # [B, K, S, E] in the compute dtype
    name = name if name in cache else "k"
    if not quantized:
      return cache[name]
    return dequantize_kv(cache[name], cache[f"{name}_scale"], q_BTHE.dtype)

  if quantized:  # this step's own keys/values as the cache will hold them (as paged does)
    k_BTKE, v_BTKE = (dequantize_kv(*quantize_kv(x), x.dtype) for x in (k_BTKE, v_BTKE))
  if len(names) == 1:
    v_BTKE = k_BTKE

  s = cache["k"].shape[2]
  chosen = IMPLEMENTATIONS[impl](t, s, q_BTHE.shape[3], window, block_q, block_k, softcap)
  if chosen.whole is not None:  # a kernel ([B, S, K, E]): one pass over the updated cache
    updated = update(cache, k_BTKE, v_BTKE)
    k_BSKE, v_BSKE = (jnp.swapaxes(read(updated, name), 1, 2) for name in ("k", "v"))
    out = attend(impl, q_BTHE, k_BSKE, v_BSKE, jnp.ones((b, t), jnp.int32),
                 kv_segment_ids_BS=kv_valid_BS.astype(jnp.int32), q_offset=slot, window=window,
                 block_q=block_q, block_k=block_k, softcap=softcap)
    return out, updated
  ones_BT = jnp.ones((b, t), jnp.int32)
  new_valid_BT = jax.lax.dynamic_slice(kv_valid_BS, (0, slot), (b, t)).astype(jnp.int32)
  o_new, lse_new = xla_blocks(window, softcap=softcap).fwd(q_BTHE, k_BTKE, v_BTKE, ones_BT, new_valid_BT,
                                          slot, slot)
  if isinstance(slot, int) and slot == 0:  # a prefill into an empty cache: nothing before
    return o_new, update(cache, k_BTKE, v_BTKE)
  before_BS = kv_valid_BS & (jnp.arange(s)[None, :] < slot)  # the slots filled earlier
  o_cache, lse_cache = xla_blocks(window, kv="bkse", softcap=softcap).fwd(
      q_BTHE, read(cache, "k"), read(cache, "v"), ones_BT, before_BS.astype(jnp.int32), slot, 0)
  out, _ = merge(o_cache.astype(jnp.float32), lse_cache, o_new, lse_new)
  # The write must follow the reads of the old cache, and XLA orders them only by data
  # dependence (an optimization barrier does not do it): without one it copies every
  # layer's cache at every token. Adding 0 x (this row's output) ties each row's write to
  # its reads without changing it.
  tie_BT11 = 0.0 * out[:, :, :1, :1]
  return out.astype(q_BTHE.dtype), update(cache, k_BTKE + tie_BT11.astype(k_BTKE.dtype),
                                          v_BTKE + tie_BT11.astype(v_BTKE.dtype))


def attend(impl: str, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, *, kv_segment_ids_BS=None,
           q_offset=0, window: int | None = None, block_q: int | None = None,
           block_k: int | None = None, softcap: float | None = None):
  """Causal attention within segments by the named implementation, on the ambient mesh.

  Self-attention by default; with `kv_segment_ids_BS` (a KV cache) the keys are their own
  sequence and queries sit at positions q_offset + t. `softcap`: logits cap x tanh(s / cap)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}; allowed: {list(IMPLEMENTATIONS)}")
  mesh = _current_mesh()
  cached = kv_segment_ids_BS is not None
  kv_seg_BS = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
  t, e, s = q_BTHE.shape[1], q_BTHE.shape[3], k_BSKE.shape[1]
  length = None if cached else "length"  # a cache is never split along its slots
  q_spec = None if mesh is None else logical_to_spec(("batch", length, "act_heads", "head_dim"),
                                                     q_BTHE.shape, mesh)
  ring = q_spec is not None and q_spec[1] is not None
  n_chunks = mesh.shape[SEQUENCE_AXIS] if ring else 1
  chosen = IMPLEMENTATIONS[impl](t // n_chunks, s // n_chunks, e, window, block_q, block_k,
                                 softcap)
  if chosen.whole is None and not ring:
    return xla_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, window, kv_seg_BS, q_offset,
                         softcap)

  def local(q, k, v, seg, kv_seg, offset):
    if ring:
      return ring_attention(q, k, v, seg, chosen.blocks, SEQUENCE_AXIS)
    return chosen.whole(q, k, v, seg, kv_seg, offset)

  q_offset = jnp.asarray(q_offset, jnp.int32)
  if mesh is None:
    return local(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_seg_BS, q_offset)
  k_spec = logical_to_spec(("batch", length, "act_kv_heads", "head_dim"), k_BSKE.shape, mesh)
  if q_spec[2] != k_spec[2]:  # K/V heads don't split like query heads: give each its own
    h = q_BTHE.shape[2]
    k_BSKE, v_BSKE = (jnp.repeat(x, h // k_BSKE.shape[2], axis=2) for x in (k_BSKE, v_BSKE))
    k_spec = P(k_spec[0], k_spec[1], q_spec[2], q_spec[3])
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(q_spec, k_spec, k_spec, P(*q_spec[:2]), P(*k_spec[:2]), P()),
                       out_specs=q_spec, check_vma=chosen.check_vma)(
                           q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_seg_BS, q_offset)


def attend_paged(impl: str, q_THE, k_TKE, v_TKE, pages, paged: dict, *,
                 window: int | None = None, softcap: float | None = None):
  """A flat batch of tokens [T, ...] from many sequences: writes each token's key and
  value into its page (`paged["page"]`, `paged["slot"]`: [T]), then attends each token
  over its sequence's pages (`paged["kv_lens"]`, `paged["page_table"]`,
  `paged["cu_q_lens"]`, `paged["num_seqs"]`: see llm.ops.attention.paged). pages:
  {"kv": [num_pages, page_size, 2K, E]}, int8 with "kv_scale" [num_pages, page_size, 2K];
  pages of [.., K, E] hold keys that are their own values (MLA's latent; v_TKE unused).
  Returns (out_THE, pages).

  "flash" on a TPU runs JAX's Pallas ragged paged attention kernel (per shard of heads on
  a mesh) over float pages; everywhere else, for "xla" and for int8 pages, the XLA
  implementation runs."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}; allowed: {list(IMPLEMENTATIONS)}")
  where = (paged["page"], paged["slot"])
  shared = pages["kv"].shape[2] == k_TKE.shape[1]
  v_TKE = None if shared else v_TKE
  if "kv_scale" in pages:  # int8 pages (model.kv_quant): always the XLA implementation
    kv_pages, kv_scale = write_pages(pages["kv"], k_TKE, v_TKE, *where, pages["kv_scale"])
    out_THE = paged_attention(q_THE, kv_pages, paged["kv_lens"], paged["page_table"],
                              paged["cu_q_lens"], paged["num_seqs"], window=window,
                              kv_scale_PNC=kv_scale, softcap=softcap, shared_kv=shared)
    return out_THE, {"kv": kv_pages, "kv_scale": kv_scale}
  kv_pages = write_pages(pages["kv"], k_TKE, v_TKE, *where)
  args = (q_THE, kv_pages, paged["kv_lens"], paged["page_table"], paged["cu_q_lens"],
          paged["num_seqs"])
  xla = functools.partial(paged_attention, window=window, softcap=softcap, shared_kv=shared)
  if impl == "flash" and not shared:  # the TPU kernel takes interleaved K and V pages
    out_THE = jax.lax.platform_dependent(
        *args, tpu=functools.partial(_tpu_paged_attention, window=window, softcap=softcap),
        default=xla)
  else:
    out_THE = xla(*args)
  return out_THE, {"kv": kv_pages}


def kv_pages_spec(shape_PNCE, mesh):
  """How KV pages [P, N, 2K, E] split on a mesh: the interleaved head axis by the K heads'
  rule, so that each shard holds whole (key, value) head pairs."""
  p, n, c, e = shape_PNCE
  return logical_to_spec((None, None, "kv_heads", "head_dim"), (p, n, max(c // 2, 1), e), mesh)


def _tpu_paged_attention(q_THE, kv_pages_PNCE, kv_lens_S, page_table_SM, cu_q_lens_S1,
                         num_seqs_1, *, window, softcap):
  """JAX's Mosaic ragged paged attention kernel; inside shard_map over heads on a mesh
  (a custom call cannot be partitioned by GSPMD)."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

  # block sizes given, not looked up: the lookup asks the local device for its TPU
  # version, which an ahead-of-time compile for a TPU topology does not have
  n, m = kv_pages_PNCE.shape[1], page_table_SM.shape[1]
  blocks = dict(num_kv_pages_per_block=min(max(TPU_KEYS_PER_BLOCK // n, 1), m),
                num_queries_per_block=min(TPU_QUERIES_PER_BLOCK, q_THE.shape[0]))

  def local(q, kv, kv_lens, table, cu, num_seqs):
    return ragged_paged_attention(q, kv, kv_lens, table, cu, num_seqs,
                                  sm_scale=q.shape[-1] ** -0.5, sliding_window=window,
                                  soft_cap=softcap, **blocks)

  args = (q_THE, kv_pages_PNCE, kv_lens_S, page_table_SM, cu_q_lens_S1, num_seqs_1)
  mesh = _current_mesh()
  if mesh is None:
    return local(*args)
  kv_spec = kv_pages_spec(kv_pages_PNCE.shape, mesh)
  q_spec = logical_to_spec((None, "act_heads", "head_dim"), q_THE.shape, mesh)
  if kv_spec[2] != q_spec[1]:  # heads that don't split alike: every shard runs them all
    kv_spec, q_spec = P(None, None, None, kv_spec[3]), P(None, None, q_spec[2])
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, P(), P(), P(), P()),
                       out_specs=q_spec, check_vma=False)(*args)
