"""Batched KV-cache decoding with static shapes: a jitted prefill, then a jitted step per
token, attending through the same attention dispatch as training.

Tokens are generated `chunk` at a time by one jitted loop (no host round trip per token);
the host then streams them and stops at the first chunk where every row has stopped.

On CPU a scanned model decodes unrolled (its params unstacked once per Decoder) with one
KV-cache buffer per layer: a scan would slice every layer's weights and cache out of the
stacked arrays and stack the cache again at every token, copies that cost as much as the
matmuls when decoding is memory-bound; per-layer buffers are donated and updated in place.
There the projection kernels are also stored out-major ([out, in], model.out_major_kernels):
a decode step is a chain of matrix-vector products, which XLA:CPU runs up to 1.3x faster
over that layout.

`Decoder(model_cfg, params).generate(prompts_as_token_ids, max_tokens, sampling)`; the
text API (`llm.inference.text`) wraps it with a tokenizer.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm.config import kv_cache_vectors
from llm.inference.sampling import SamplingParams, sample
from llm.model import make_model, quant, require_lm_head
from llm.model.transformer import to_out_major, unstack_layers


def round_up(n: int, multiple: int) -> int:
  """`n` rounded up to a multiple, so nearby lengths share one compiled shape."""
  return -(-n // multiple) * multiple


def _prefill(model, params, tokens_BP, valid_BP, cache):
  """Runs the prompts through the model, filling the cache; returns the last logits."""
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  s = jax.tree.leaves(cache)[0].shape[-2]  # [(L,) B, K, S, E]
  kv_valid_BS = jnp.zeros((tokens_BP.shape[0], s), bool).at[:, :tokens_BP.shape[1]].set(valid_BP)
  decode = {"slot": 0, "kv_valid": kv_valid_BS}  # a static 0: the cache starts empty
  logits_B1V, cache = model.apply({"params": params}, tokens_BP, None, positions_BP, cache,
                                  decode, last_only=True)  # prompts are left-padded
  return logits_B1V[:, 0], cache, kv_valid_BS, positions_BP[:, -1] + 1


def _step(model, params, carry, *, sampling: SamplingParams):
  """Samples a token from the last logits, feeds it, returns (carry, token)."""
  rng, key = jax.random.split(carry["rng"])
  token_B = sample(key, carry["logits"], sampling, carry["seen"])
  slot = carry["slot"]
  kv_valid_BS = jax.lax.dynamic_update_slice(
      carry["kv_valid"], jnp.ones((token_B.shape[0], 1), bool), (0, slot))
  decode = {"slot": slot, "kv_valid": kv_valid_BS}
  logits_B1V, cache = model.apply({"params": params}, token_B[:, None], None,
                                  carry["positions"][:, None], carry["cache"], decode)
  seen = carry["seen"]
  if seen is not None:
    seen = seen.at[jnp.arange(token_B.shape[0]), token_B].set(True)
  carry = dict(cache=cache, kv_valid=kv_valid_BS, slot=slot + 1, positions=carry["positions"] + 1,
               logits=logits_B1V[:, 0], rng=rng, seen=seen)
  return carry, token_B


def _steps(model, params, carry, *, sampling: SamplingParams, n: int):
  """`n` decode steps in one loop: (carry, tokens [n, B])."""
  return jax.lax.scan(lambda c, _: _step(model, params, c, sampling=sampling), carry, None,
                      length=n)


@functools.lru_cache(maxsize=8)
def _programs(model_cfg_json: str):
  """(model, jitted prefill, jitted n-step decode) of one model config, shared by every
  Decoder of it: a new Decoder (e.g. per batch of prompts, or over new params) compiles
  nothing new."""
  model = make_model(ml_collections.ConfigDict(json.loads(model_cfg_json)))
  return (model, jax.jit(functools.partial(_prefill, model), donate_argnums=(3,)),
          jax.jit(functools.partial(_steps, model), static_argnames=("sampling", "n"),
                  donate_argnums=(1,)))


class Decoder:
  """Batched KV-cache decoding with static shapes: a jitted prefill, then a jitted step
  per token. Prompts of different lengths are left-padded; pads are never attended to
  and positions start at 0 at each prompt's first real token."""

  def __init__(self, model_cfg, params, unroll: bool | None = None, chunk: int = 8):
    """`unroll` (default: on CPU) decodes a scanned model layer by layer (see above);
    `chunk` tokens are generated per jitted loop."""
    require_lm_head(model_cfg, "generation")
    if chunk < 1:
      raise ValueError(f"chunk={chunk} must be >= 1 (tokens per jitted decode loop)")
    self.chunk = chunk
    if unroll is None:
      unroll = jax.default_backend() == "cpu"
    self.unrolled = bool(unroll and model_cfg.scan_layers)
    # LoRA and quantized kernels keep [in, out]: such a model decodes in its own layout
    self.out_major = (self.unrolled and not model_cfg.lora.rank and not model_cfg.mla.kv_lora_rank
                      and model_cfg.weight_quant == "none" and not model_cfg.out_major_kernels)
    self._params_cfg = model_cfg  # the layout of the params callers pass
    # Rematerialisation only matters for a backward pass. Under it the decode arguments
    # become tracers, so a prefill into an empty cache (slot 0) could no longer skip the
    # cache chunk, whose all-false mask XLA:CPU then constant-folds for seconds per layer.
    model_cfg = ml_collections.ConfigDict(ml_collections.ConfigDict(model_cfg).to_dict())
    model_cfg.remat = "none"
    if self.unrolled:
      model_cfg.scan_layers = False
      self._unstacked_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
      model_cfg.out_major_kernels = model_cfg.out_major_kernels or self.out_major
    self.cfg = model_cfg
    self.params = params
    key = json.dumps(ml_collections.ConfigDict(model_cfg).to_dict(), sort_keys=True)
    self.model, self._prefill, self._steps = _programs(key)

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, params):
    """The model's params as trained (stacked layers); unstacked (and out-major) here
    when unrolled."""
    if self.unrolled and params is not None:
      params = unstack_layers(params, self._params_cfg)
      params = to_out_major(params, self._unstacked_cfg) if self.out_major else params
    self._params = params

  @staticmethod
  def shapes(prompt_len: int, max_tokens: int) -> tuple[int, int]:
    """(padded prompt length, cache length) for a longest prompt and a token budget."""
    p_len = round_up(prompt_len, 16)
    return p_len, round_up(p_len + max_tokens, 64)

  def init_cache(self, batch: int, max_len: int):
    """{"k", "v"} of [L, B, K, S, E], or (unrolled) a list of L {"k", "v"} of [B, K, S, E]
    (heads-major: a decode step reads each head's keys and values contiguously); int8
    with "k_scale", "v_scale" [(L,) B, K, S] under model.kv_quant; {"k"} alone of
    [(L,) B, 1, S, latent + rope] for MLA (keys that are their own values)."""
    c = self.cfg
    vectors, width, shared = kv_cache_vectors(c)
    shape = (batch, vectors if shared else vectors // 2, max_len, width)
    names = ("k",) if shared else ("k", "v")
    dtype = jnp.dtype(c.dtype)

    def layer(lead=()):
      if c.kv_quant == "int8":  # int8 values, an f32 scale per token and head
        return {**{n: jnp.zeros(lead + shape, jnp.int8) for n in names},
                **{f"{n}_scale": jnp.zeros(lead + shape[:3], jnp.float32) for n in names}}
      return {n: jnp.zeros(lead + shape, dtype) for n in names}

    if not c.scan_layers:
      return [layer() for _ in range(c.n_layers)]
    return layer((c.n_layers,))

  def _check_cache_fits(self, batch: int, prompt_len: int, cache_len: int, max_tokens: int):
    """Refuses, before allocating, a KV cache larger than half the device's memory."""
    c = self.cfg
    per_slot = batch * quant.kv_bytes_per_token(c)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    memory = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_slot * cache_len > memory // 2:
      fits = max(memory // 2 // per_slot - prompt_len - 64, 0)
      raise ValueError(f"max_tokens={max_tokens} needs a {per_slot * cache_len / 2**30:,.1f} GiB "
                       f"KV cache for {batch} prompt(s), more than half of the "
                       f"{memory / 2**30:,.1f} GiB of {device.device_kind} memory; at most "
                       f"about {fits:,} tokens fit")

  def generate(self, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams,
               seed: int = 0, eos_id=None, on_token=None,
               keep_stop: bool = False) -> list[list[int]]:
    """Continuations of each prompt, without the token that stopped it (with it when
    `keep_stop`: a continuation shorter than max_tokens, or ending in a stop id, stopped);
    `eos_id` is one token id or several (e.g. EOS and a chat template's end of turn).
    `on_token(step, tokens_B, done_B)` is called after every step, e.g. to stream text."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if max_tokens < 1:
      raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    b = len(prompts)
    n = min(self.chunk, max_tokens)
    # the cache holds whole chunks: steps past max_tokens in the last one are discarded
    p_len, s = self.shapes(max(len(p) for p in prompts), round_up(max_tokens, n))
    self._check_cache_fits(b, p_len, s, max_tokens)
    tokens = np.zeros((b, p_len), np.int32)
    valid = np.zeros((b, p_len), bool)
    for i, prompt in enumerate(prompts):
      tokens[i, p_len - len(prompt):] = prompt
      valid[i, p_len - len(prompt):] = True
    logits, cache, kv_valid, positions = self._prefill(self.params, jnp.asarray(tokens),
                                                       jnp.asarray(valid), self.init_cache(b, s))
    seen = None
    if sampling.repetition_penalty != 1.0:
      seen = np.zeros((b, self.cfg.vocab_size), bool)
      for i, prompt in enumerate(prompts):
        seen[i, prompt] = True
      seen = jnp.asarray(seen)
    carry = dict(cache=cache, kv_valid=kv_valid, slot=jnp.int32(p_len), positions=positions,
                 logits=logits, rng=jax.random.key(seed), seen=seen)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    stop = set() if eos_id is None else {int(eos_id)} if np.ndim(eos_id) == 0 else set(eos_id)
    step = 0
    while step < max_tokens and not done.all():
      carry, tokens_NB = self._steps(self.params, carry, sampling=sampling, n=n)
      for token_B in np.asarray(tokens_NB)[:max_tokens - step]:
        self._take(token_B, step, out, done, stop, keep_stop, on_token)
        step += 1
        if done.all():
          break
    return out

  @staticmethod
  def _take(token_B, step, out, done, stop, keep_stop, on_token):
    """Appends one step's tokens to the rows still running; marks rows that stopped."""
    for i, token in enumerate(token_B.tolist()):
      if not done[i]:
        if token in stop:
          done[i] = True
          if keep_stop:
            out[i].append(token)
        else:
          out[i].append(token)
    if on_token is not None:
      on_token(step, token_B, done.copy())
