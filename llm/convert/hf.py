"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Mixtral / Qwen3-MoE
checkpoints <-> our params, one tensor at a time.

HF stores Linear weights as [out, in]; our Projection kernels are [in, out...]
with heads split out, and scanned layers stacked on a leading axis. Both use
the rotate-half RoPE layout, so no permutation of q/k rows is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from llm import config as config_lib

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "MixtralForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral",
                         "qwen3_moe", "deepseek_v3")
GEMMA_TYPES = ("gemma2", "gemma3_text")
# transformers' rope_type -> ours (model.rope_scaling.type)
ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
              "llama3": "llama3"}


# ----------------------------------------------------------------------------- configs

def _rope_from_hf(rope: dict, hf: dict, where: str) -> tuple[float, dict | None]:
  """(theta, our model.rope_scaling updates or None) from one transformers rope dict."""
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{where}: rope type {rope_type!r} is not supported; supported: "
                     f"{list(ROPE_TYPES)}")
  if rope_type == "default":
    return theta, None
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']} is not "
                     "supported (RoPE over the whole head)")
  out = dict(type=ROPE_TYPES[rope_type])
  if rope_type == "llama3":
    out.update(low_freq_factor=float(rope["low_freq_factor"]),
               high_freq_factor=float(rope["high_freq_factor"]),
               original_max_position=int(rope["original_max_position_embeddings"]))
  elif rope_type == "dynamic":  # transformers scales past max_position_embeddings
    out.update(original_max_position=int(hf["max_position_embeddings"]))
  elif rope_type == "yarn":
    old_len = int(rope.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    out.update(original_max_position=old_len,
               beta_fast=float(rope.get("beta_fast") or 32.0),
               beta_slow=float(rope.get("beta_slow") or 1.0),
               mscale=float(rope.get("mscale") or 0.0),
               mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
               attention_factor=float(rope.get("attention_factor") or 0.0),
               truncate=bool(rope.get("truncate", True)))
    if rope.get("factor") is None:
      rope = dict(rope, factor=hf["max_position_embeddings"] / old_len)
  out["factor"] = float(rope["factor"])
  return theta, out


def _rope_to_hf(theta: float, scaling) -> dict:
  """One transformers rope dict for our theta and model.rope_scaling (None: unscaled)."""
  rope = {"rope_type": "default", "rope_theta": float(theta)}
  if scaling is None or scaling.type == "none":
    return rope
  s = scaling
  rope.update(rope_type={v: k for k, v in ROPE_TYPES.items()}[s.type], factor=float(s.factor))
  if s.type == "llama3":
    rope.update(low_freq_factor=float(s.low_freq_factor), high_freq_factor=float(s.high_freq_factor),
                original_max_position_embeddings=int(s.original_max_position))
  elif s.type == "yarn":
    rope.update(original_max_position_embeddings=int(s.original_max_position),
                beta_fast=float(s.beta_fast), beta_slow=float(s.beta_slow),
                truncate=bool(s.truncate))
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
      if s[name]:
        rope[name] = float(s[name])
  return rope


def _window_pattern(hf: dict, arch) -> tuple[int, int]:
  """(sliding_window, sliding_window_pattern) from a Gemma config's layer_types: every
  n-th layer global (n - 1, 2n - 1, ...), the others sliding."""
  n_layers = hf["num_hidden_layers"]
  types = hf.get("layer_types")
  if types is None:
    pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or
                  (2 if hf["model_type"] == "gemma2" else 6))
    types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
             for i in range(n_layers)]
  if set(types) - {"full_attention", "sliding_attention"} or len(types) != n_layers:
    raise ValueError(f"{arch} layer_types={types}: expected {n_layers} entries of "
                     "'full_attention' / 'sliding_attention'")
  if "sliding_attention" not in types:
    return 0, 0
  pattern = types.index("full_attention") + 1 if "full_attention" in types else 0
  expected = ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention"
              for i in range(n_layers)]
  if types != expected:
    raise ValueError(f"{arch} layer_types={types}: only every n-th layer global (layers n-1, "
                     "2n-1, ...; Gemma's pattern) is supported")
  return int(hf["sliding_window"]), pattern


def _gemma_updates_from_hf(hf: dict, arch) -> dict:
  act = hf.get("hidden_activation") or hf.get("hidden_act")
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"{arch} hidden_activation={act!r} is not supported; only "
                     "'gelu_pytorch_tanh' (GeGLU)")
  if hf.get("use_bidirectional_attention"):
    raise ValueError(f"{arch} use_bidirectional_attention=true is not supported (causal only)")
  window, pattern = _window_pattern(hf, arch)
  updates = dict(norm_plus_one=True, post_norms=True, embed_scale=True,
                 mlp_activation="gelu_tanh", qk_norm=hf["model_type"] == "gemma3_text",
                 attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                 final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                 query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 0.0),
                 sliding_window=window, sliding_window_pattern=pattern,
                 tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
  rope = hf.get("rope_parameters") or {}
  if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3: per layer type
    theta, scaling = _rope_from_hf(rope.get("full_attention") or {}, hf, f"{arch} full_attention")
    local = rope.get("sliding_attention") or {}
    local_theta, local_scaling = _rope_from_hf(local, hf, f"{arch} sliding_attention")
    if local_scaling is not None:
      raise ValueError(f"{arch}: RoPE scaling on the sliding-window layers "
                       f"({local.get('rope_type')!r}) is not supported")
    if window and (local_theta != theta or scaling is not None):  # local layers: own, unscaled
      updates["rope_local_theta"] = local_theta
  else:
    theta, scaling = _rope_from_hf(dict(rope or hf.get("rope_scaling") or {}), hf, arch)
  updates["rope_theta"] = theta
  if scaling is not None:
    updates["rope_scaling"] = scaling
  return updates


def _deepseek_updates_from_hf(hf: dict, arch) -> dict:
  """MLA and DeepSeek's MoE (sigmoid router over expert groups, shared experts, the first
  layers dense) from a DeepseekV3 config."""
  if hf.get("attention_bias"):
    raise ValueError(f"{arch} attention_bias=true is not supported")
  nope, rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
  n_layers, k = hf["num_hidden_layers"], int(hf.get("first_k_dense_replace") or 0)
  if not hf.get("rope_interleave", True):
    raise ValueError(f"{arch} rope_interleave=false is not supported (DeepSeek's checkpoints "
                     "interleave)")
  mla = dict(kv_lora_rank=int(hf["kv_lora_rank"]), q_lora_rank=int(hf.get("q_lora_rank") or 0),
             qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(hf["v_head_dim"]))
  moe = dict(n_experts=int(hf["n_routed_experts"]), top_k=int(hf["num_experts_per_tok"]),
             d_ff=int(hf["moe_intermediate_size"]), n_shared=int(hf.get("n_shared_experts") or 0),
             norm_topk_prob=bool(hf.get("norm_topk_prob", True)), router="sigmoid",
             n_groups=int(hf.get("n_group") or 1), topk_groups=int(hf.get("topk_group") or 1),
             routed_scaling=float(hf.get("routed_scaling_factor") or 1.0), first_dense=k,
             load_balance_weight=0.0, router_z_weight=0.0, routed_bias_update_rate=0.001)
  updates = dict(mla=mla, head_dim=nope + rope, n_kv_heads=hf["num_attention_heads"],
                 qk_norm=False, sliding_window=0)
  if k < n_layers:
    updates.update(mlp="moe", moe=moe)
  return updates


def model_updates_from_hf(hf: dict) -> dict:
  """Our model config fields from an HF config.json (transformers 4.x or 5.x layout)."""
  arch = (hf.get("architectures") or [None])[0]
  if hf.get("model_type") not in SUPPORTED_MODEL_TYPES or (arch and arch not in SUPPORTED_ARCHITECTURES):
    raise ValueError(f"unsupported architecture {arch!r} (model_type {hf.get('model_type')!r}); "
                     f"supported: {list(SUPPORTED_ARCHITECTURES)}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag) and not (flag == "attention_bias" and hf.get("model_type") == "qwen2"):
      raise ValueError(f"config.json sets {flag}=true; Llama-family models here have no biases")
  gemma = hf["model_type"] in GEMMA_TYPES
  if not gemma and hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
  updates = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=0 if head_dim * n_heads == hf["hidden_size"] else head_dim,
      d_ff=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=False,
      sliding_window=int(hf.get("sliding_window") or 0))
  if gemma:
    updates.update(_gemma_updates_from_hf(hf, arch))
  else:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    updates["rope_theta"], scaling = _rope_from_hf(rope, hf, str(arch))
    if scaling is not None:
      updates["rope_scaling"] = scaling
  if hf["model_type"] in ("qwen2", "qwen3"):  # Llama with q/k/v biases (2), QK-norm (3)
    if hf.get("use_sliding_window"):
      raise ValueError(f"{arch} use_sliding_window=true (windows on some layers) is not "
                       "supported; every layer attends fully here")
    updates.update(qk_norm=hf["model_type"] == "qwen3", qkv_bias=hf["model_type"] == "qwen2",
                   sliding_window=0)
  if hf["model_type"] in ("mixtral", "qwen3_moe"):
    updates.update(mlp="moe", moe=_moe_updates_from_hf(hf))
    updates["qk_norm"] = hf["model_type"] == "qwen3_moe"
  if hf["model_type"] == "deepseek_v3":
    updates.update(_deepseek_updates_from_hf(hf, arch))
  model = config_lib.base_config().model
  model.update(updates)
  layers, unit = config_lib.scan_unit(model)
  if layers % unit:  # no whole number of scanned units
    updates["scan_layers"] = False
  return updates


def _moe_updates_from_hf(hf: dict) -> dict:
  """model.moe from a Mixtral or Qwen3-MoE config (no shared experts; Qwen3's
  decoder_sparse_step n makes every n-th layer sparse, the others dense)."""
  qwen = hf["model_type"] == "qwen3_moe"
  every = int(hf.get("decoder_sparse_step", 1) or 1) if qwen else 1
  if qwen and hf.get("mlp_only_layers"):
    raise ValueError(f"Qwen3-MoE mlp_only_layers={hf['mlp_only_layers']} is not supported: "
                     "dense layers must come from decoder_sparse_step (every n-th layer sparse)")
  if hf["num_hidden_layers"] % every:
    raise ValueError(f"Qwen3-MoE decoder_sparse_step={every} must divide num_hidden_layers="
                     f"{hf['num_hidden_layers']}")
  n_experts = hf.get("num_local_experts") or hf["num_experts"]
  return dict(n_experts=int(n_experts), top_k=int(hf["num_experts_per_tok"]),
              d_ff=int(hf["moe_intermediate_size"]) if qwen else 0, n_shared=0,
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if qwen else True,
              load_balance_weight=float(hf.get("router_aux_loss_coef", 0.01)), every=every)


def _hf_moe_config(c) -> dict:
  """The Mixtral or Qwen3-MoE fields for a MoE model."""
  m = c.moe
  if m.n_shared:
    raise ValueError("model.moe.n_shared > 0 (shared experts) has no Mixtral/Qwen3-MoE "
                     "equivalent in transformers")
  if c.qk_norm:  # Qwen3-MoE
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_experts": m.n_experts, "num_local_experts": m.n_experts,
            "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.d_ff or c.d_ff,
            "norm_topk_prob": bool(m.norm_topk_prob), "decoder_sparse_step": m.every,
            "mlp_only_layers": [], "router_aux_loss_coef": m.load_balance_weight,
            "use_sliding_window": False}
  if m.every != 1:
    raise ValueError(f"model.moe.every={m.every}: Mixtral has every layer sparse; dense layers "
                     "between MoE layers export as Qwen3-MoE (model.qk_norm=True)")
  if not m.norm_topk_prob or m.d_ff not in (0, c.d_ff):
    raise ValueError("a MoE model without QK-norm exports as Mixtral, which renormalises the "
                     "top-k probabilities and has experts of model.d_ff: set "
                     "model.moe.norm_topk_prob=True and model.moe.d_ff=0")
  return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k,
          "router_aux_loss_coef": m.load_balance_weight}


def _hf_gemma_config(c) -> dict:
  """The Gemma 2 (no QK-norm) or Gemma 3 (QK-norm) fields for a Gemma-style model."""
  wanted = dict(norm_plus_one=True, post_norms=True, embed_scale=True, mlp_activation="gelu_tanh",
                mlp="dense", qkv_bias=False)
  off = [f"model.{k}={c[k]!r}" for k, v in wanted.items() if c[k] != v]
  if off:
    raise ValueError(f"a Gemma-style model (model.post_norms) exports as Gemma 2/3, which "
                     f"needs {wanted}; this one has {', '.join(off)}")
  gemma3 = bool(c.qk_norm)
  if not float(c.query_pre_attn_scalar).is_integer():
    raise ValueError(f"model.query_pre_attn_scalar={c.query_pre_attn_scalar}: Gemma's config "
                     "holds a whole number")
  if gemma3 and c.attn_logit_softcap:
    raise ValueError("model.qk_norm=True exports as Gemma 3, which has no attention "
                     "soft-capping: model.attn_logit_softcap must be 0")
  if not gemma3 and c.rope_local_theta:
    raise ValueError("model.rope_local_theta exports as Gemma 3 (model.qk_norm=True); Gemma 2's "
                     "layers share one RoPE")
  from llm.model.transformer import layer_kind
  layer_types = ["sliding_attention" if layer_kind(c, i).local else "full_attention"
                 for i in range(c.n_layers)]
  global_rope = _rope_to_hf(c.rope_theta, c.rope_scaling)
  out = {"architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
         "model_type": "gemma3_text" if gemma3 else "gemma2", "layer_types": layer_types,
         "sliding_window": c.sliding_window or None, "hidden_activation": "gelu_pytorch_tanh",
         "query_pre_attn_scalar": int(c.query_pre_attn_scalar or (c.head_dim or
                                                                  c.d_model // c.n_heads)),
         "attn_logit_softcapping": c.attn_logit_softcap or None,
         "final_logit_softcapping": c.final_logit_softcap or None,
         "use_bidirectional_attention": False}
  if gemma3:
    local = _rope_to_hf(c.rope_local_theta, None) if c.rope_local_theta else global_rope
    out["rope_parameters"] = {"full_attention": global_rope, "sliding_attention": local}
  return out


def _hf_deepseek_config(c) -> dict:
  """The DeepseekV3 fields of an MLA model (MoE with a sigmoid router, or all dense)."""
  m, e = c.mla, c.moe
  if c.mlp == "moe" and (e.router != "sigmoid" or e.every != 1):
    raise ValueError("an MLA model exports as DeepSeek-V3, whose MoE layers have a sigmoid "
                     "router (model.moe.router='sigmoid') and follow the first_dense ones "
                     "(model.moe.every=1)")
  if c.tie_embeddings or c.post_norms or c.mlp_activation != "silu":
    raise ValueError("an MLA model exports as DeepSeek-V3: untied embeddings, no post-norms, "
                     "SwiGLU")
  moe = c.mlp == "moe"
  return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "kv_lora_rank": m.kv_lora_rank, "q_lora_rank": m.q_lora_rank or None,
          "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
          "v_head_dim": m.v_head_dim, "qk_head_dim": m.qk_nope_head_dim + m.qk_rope_head_dim,
          "head_dim": m.qk_rope_head_dim, "rope_interleave": True,
          "num_key_value_heads": c.n_heads,
          "n_routed_experts": e.n_experts if moe else 1,
          "num_experts_per_tok": e.top_k if moe else 1,
          "moe_intermediate_size": (e.d_ff or c.d_ff) if moe else c.d_ff,
          "n_shared_experts": e.n_shared if moe else 0, "norm_topk_prob": bool(e.norm_topk_prob),
          "n_group": e.n_groups if moe else 1, "topk_group": e.topk_groups if moe else 1,
          "routed_scaling_factor": float(e.routed_scaling) if moe else 1.0,
          "first_k_dense_replace": e.first_dense if moe else c.n_layers}


def hf_config_from_model(model_cfg, max_position: int, bos_id: int = 1, eos_id: int = 2) -> dict:
  c = model_cfg
  if c.sliding_window_pattern and not c.post_norms:
    raise ValueError("model.sliding_window_pattern (local and global layers) exports as Gemma "
                     "2/3 only (model.post_norms=True and its Gemma settings)")
  if c.qk_norm and c.mlp != "moe" and c.sliding_window and not c.post_norms:
    raise ValueError("model.qk_norm=True exports as Qwen3, whose sliding window is per "
                     "layer: model.sliding_window must be 0")
  if not c.post_norms:
    gemma_only = [f"model.{k}={c[k]!r}" for k in ("norm_plus_one", "embed_scale",
                                                  "attn_logit_softcap", "final_logit_softcap",
                                                  "query_pre_attn_scalar", "rope_local_theta")
                  if c[k]] + ([f"model.mlp_activation={c.mlp_activation!r}"]
                              if c.mlp_activation != "silu" else [])
    if gemma_only:
      raise ValueError(f"{', '.join(gemma_only)} export only as Gemma 2/3, which also needs "
                       "model.post_norms=True")
  head_dim = c.head_dim or c.d_model // c.n_heads
  arch, model_type = ("MistralForCausalLM", "mistral") if c.sliding_window else (
      "LlamaForCausalLM", "llama")
  family = {}
  if c.qkv_bias and (c.qk_norm or c.mlp == "moe" or c.sliding_window):
    raise ValueError("model.qkv_bias=True exports as Qwen2: a dense model without QK-norm "
                     "or sliding window")
  if c.mla.kv_lora_rank:
    family = _hf_deepseek_config(c)
  elif c.post_norms:
    family = _hf_gemma_config(c)
  elif (c.qk_norm and c.mlp != "moe") or c.qkv_bias:
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if c.qk_norm else ("Qwen2ForCausalLM",
                                                                         "qwen2")
    family = {"use_sliding_window": False, "layer_types": ["full_attention"] * c.n_layers}
  if c.rope_scaling.type == "dynamic":  # transformers scales past max_position_embeddings
    max_position = int(c.rope_scaling.original_max_position)
  return {
      "architectures": [arch], "model_type": model_type,
      "sliding_window": c.sliding_window or None,
      "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
      "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
      "num_key_value_heads": c.n_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
      "rms_norm_eps": c.norm_eps, "rope_parameters": _rope_to_hf(c.rope_theta, c.rope_scaling),
      "rope_theta": float(c.rope_theta),
      "tie_word_embeddings": bool(c.tie_embeddings), "max_position_embeddings": max_position,
      "attention_bias": bool(c.qkv_bias), "mlp_bias": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
      "torch_dtype": "float32", "dtype": "float32",
      **(_hf_moe_config(c) if c.mlp == "moe" and not c.mla.kv_lora_rank else {}), **family,
  }


# ----------------------------------------------------------------------------- tensors

def _layer_map(c, family: str, mlp: str):
  """[(HF suffix, our path under the layer's block, index within the layer's array,
  HF -> ours, ours -> HF)] for one decoder layer with MLP kind `mlp`; HF Linear weights
  are [out, in]."""
  h, k, d = c.n_heads, c.n_kv_heads, c.d_model
  e = c.head_dim or d // h
  same = lambda w: w  # noqa: E731
  if c.mla.kv_lora_rank:
    out = _mla_map(c) + [("input_layernorm.weight", ("attn_norm", "scale"), (), same, same),
                         ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (), same,
                          same)]
    return out + _mlp_map(c, family, mlp)
  out = [
      ("self_attn.q_proj.weight", ("attn", "q", "kernel"), (), lambda w: w.T.reshape(d, h, e),
       lambda x: x.reshape(d, -1).T),
      ("self_attn.k_proj.weight", ("attn", "k", "kernel"), (), lambda w: w.T.reshape(d, k, e),
       lambda x: x.reshape(d, -1).T),
      ("self_attn.v_proj.weight", ("attn", "v", "kernel"), (), lambda w: w.T.reshape(d, k, e),
       lambda x: x.reshape(d, -1).T),
      ("self_attn.o_proj.weight", ("attn", "o", "kernel"), (), lambda w: w.T.reshape(h, e, d),
       lambda x: x.reshape(-1, d).T),
      ("input_layernorm.weight", ("attn_norm", "scale"), (), same, same),
  ]
  if c.post_norms:  # Gemma: a norm after attention and one before and after the MLP
    out += [("post_attention_layernorm.weight", ("attn_post_norm", "scale"), (), same, same),
            ("pre_feedforward_layernorm.weight", ("mlp_norm", "scale"), (), same, same),
            ("post_feedforward_layernorm.weight", ("mlp_post_norm", "scale"), (), same, same)]
  else:
    out.append(("post_attention_layernorm.weight", ("mlp_norm", "scale"), (), same, same))
  if c.qkv_bias:
    out += [("self_attn.q_proj.bias", ("attn", "q", "bias"), (), lambda b: b.reshape(h, e),
             lambda x: x.reshape(-1)),
            ("self_attn.k_proj.bias", ("attn", "k", "bias"), (), lambda b: b.reshape(k, e),
             lambda x: x.reshape(-1)),
            ("self_attn.v_proj.bias", ("attn", "v", "bias"), (), lambda b: b.reshape(k, e),
             lambda x: x.reshape(-1))]
  if c.qk_norm:
    out += [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (), same, same),
            ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (), same, same)]
  return out + _mlp_map(c, family, mlp)


def _rope_rows(n_rope: int) -> np.ndarray:
  """Row order taking DeepSeek's interleaved RoPE pairs (x0, x1), (x2, x3), ... to the
  rotate-half layout (x0, x2, ..., x1, x3, ...) the model uses."""
  return np.concatenate([np.arange(0, n_rope, 2), np.arange(1, n_rope, 2)])


def _mla_map(c):
  """DeepSeek-V2/V3 attention tensors <-> LatentAttention's (the RoPE rows reordered)."""
  m, h, d = c.mla, c.n_heads, c.d_model
  nope, rope, dv, r, rq = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
                           m.kv_lora_rank, m.q_lora_rank)
  perm = _rope_rows(rope)
  inverse = np.argsort(perm)
  q_rows = np.concatenate([np.arange(nope), nope + perm])  # within each head
  q_back = np.concatenate([np.arange(nope), nope + inverse])
  kv_rows = np.concatenate([np.arange(r), r + perm])
  kv_back = np.concatenate([np.arange(r), r + inverse])
  same = lambda w: w  # noqa: E731

  def q_to_ours(n_in):
    return lambda w: w.reshape(h, nope + rope, n_in)[:, q_rows].transpose(2, 0, 1)

  def q_to_hf(x):
    return x[:, :, q_back].transpose(1, 2, 0).reshape(h * (nope + rope), -1)

  out = [("self_attn.kv_a_proj_with_mqa.weight", ("attn", "kv_a", "kernel"), (),
          lambda w: w[kv_rows].T, lambda x: x[:, kv_back].T),
         ("self_attn.kv_a_layernorm.weight", ("attn", "kv_a_norm", "scale"), (), same, same),
         ("self_attn.kv_b_proj.weight", ("attn", "kv_b", "kernel"), (),
          lambda w: w.T.reshape(r, h, nope + dv), lambda x: x.reshape(r, -1).T),
         ("self_attn.o_proj.weight", ("attn", "o", "kernel"), (),
          lambda w: w.T.reshape(h, dv, d), lambda x: x.reshape(-1, d).T)]
  if rq:
    out += [("self_attn.q_a_proj.weight", ("attn", "q_a", "kernel"), (), lambda w: w.T,
             lambda x: x.T),
            ("self_attn.q_a_layernorm.weight", ("attn", "q_a_norm", "scale"), (), same, same),
            ("self_attn.q_b_proj.weight", ("attn", "q_b", "kernel"), (), q_to_ours(rq), q_to_hf)]
  else:
    out.append(("self_attn.q_proj.weight", ("attn", "q", "kernel"), (), q_to_ours(d), q_to_hf))
  return out


def _mlp_map(c, family: str, mlp: str):
  """One layer's MLP tensors: dense, or a MoE block (router, its bias, experts, shared)."""
  same = lambda w: w  # noqa: E731
  t = lambda w: w.T  # noqa: E731
  if mlp != "moe":
    return [(f"mlp.{n}_proj.weight", ("mlp", n, "kernel"), (), t, t)
            for n in ("gate", "up", "down")]
  out = []
  if family == "deepseek_v3":
    out += [("mlp.gate.e_score_correction_bias", ("mlp", "router_bias"), (), same, same)]
    out += [(f"mlp.shared_experts.{n}_proj.weight", ("mlp", "shared", n, "kernel"), (), t, t)
            for n in ("gate", "up", "down")]
  if family == "mixtral":
    block, names = "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
  else:
    block, names = "mlp", {n: f"{n}_proj" for n in ("gate", "up", "down")}
  out.append((f"{block}.gate.weight", ("mlp", "router"), (), t, t))
  for j in range(c.moe.n_experts):
    out += [(f"{block}.experts.{j}.{hf_name}.weight", ("mlp", ours), (j,), t, t)
            for ours, hf_name in names.items()]
  return out


def _layer_slot(c, i: int) -> tuple[tuple[str, ...], tuple[int, ...], str]:
  """(path of layer i's block in the params, its index on the stacked axis (() when layers
  are not scanned), its MLP kind)."""
  from llm.model.transformer import first_dense, layer_kind, layer_kinds
  kinds = layer_kinds(c)
  kind = layer_kind(c, i).mlp
  if not c.scan_layers:
    return (f"layers_{i}",), (), kind
  k = first_dense(c)
  if i < k:
    return ("dense_layers",), (i,), kind
  if len(kinds) == 1:
    return ("layers",), (i - k,), kind
  return ("layers", f"block_{(i - k) % len(kinds)}"), ((i - k) // len(kinds),), kind


def _family(c) -> str:
  if c.mla.kv_lora_rank:
    return "deepseek_v3"
  return "qwen3_moe" if c.mlp == "moe" and c.qk_norm else "mixtral" if c.mlp == "moe" else "llama"


class SafetensorsReader:
  """Random access to the tensors of an HF directory's (possibly sharded) safetensors."""

  def __init__(self, hf_dir: str | os.PathLike):
    self.dir = Path(hf_dir)
    index = self.dir / "model.safetensors.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
      except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with a "
                         f"'weight_map'): {type(e).__name__}: {e}") from None
    elif (self.dir / "model.safetensors").is_file():
      with _safetensors(self.dir / "model.safetensors") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
      raise FileNotFoundError(f"{self.dir} has neither model.safetensors nor "
                              "model.safetensors.index.json")
    missing = sorted({s for s in weight_map.values() if not (self.dir / s).is_file()})
    if missing:
      raise FileNotFoundError(f"{self.dir} is missing safetensors shards {missing}")
    self.weight_map = weight_map

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:
      raise KeyError(f"tensor {name!r} is not in {self.dir}")
    with _safetensors(self.dir / self.weight_map[name]) as f:
      return f.get_tensor(name)


@contextlib.contextmanager
def _safetensors(path: Path):
  """safe_open(path) whose failures (a truncated or garbage file) are one ValueError
  naming the file, not safetensors' own error type."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework="np") as f:
      yield f
  except (KeyError, FileNotFoundError):
    raise
  except Exception as e:  # noqa: BLE001 (SafetensorError is no ValueError)
    raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                     f"{str(e)[:200]}): it is truncated or damaged") from None


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
  with _safetensors(path) as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _check(name, x, shape):
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)} but the config implies {tuple(shape)}")


def hf_to_params(reader: SafetensorsReader, c, dtype=np.float32) -> dict:
  """Our params as numpy arrays, filled tensor by tensor (peak: one copy + one tensor)."""
  from llm.model import unbox
  from llm.params import abstract_params
  shapes = unbox(abstract_params(c))
  get = lambda name: reader.get(name).astype(dtype)
  params: dict = {"embedding": get("model.embed_tokens.weight")}
  _check("model.embed_tokens.weight", params["embedding"], shapes["embedding"].shape)
  params["final_norm"] = {"scale": get("model.norm.weight")}
  _check("model.norm.weight", params["final_norm"]["scale"], shapes["final_norm"]["scale"].shape)
  if not c.tie_embeddings:
    params["unembed"] = get("lm_head.weight").T
    _check("lm_head.weight", params["unembed"], shapes["unembed"].shape)
  for i in range(c.n_layers):
    block, stack, kind = _layer_slot(c, i)
    for suffix, path, index, to_ours, to_hf in _layer_map(c, _family(c), kind):
      path = block + path
      target = shapes
      for p in path:
        target = target[p]
      node = params
      for p in path[:-1]:
        node = node.setdefault(p, {})
      stacked = node.setdefault(path[-1], np.empty(target.shape, dtype))
      hf_shape = to_hf(np.empty(target.shape[len(stack) + len(index):], np.float32)).shape
      name = f"model.layers.{i}.{suffix}"
      raw = get(name)
      _check(name, raw, hf_shape)
      stacked[(*stack, *index)] = to_ours(raw)
  return params


# an HF model directory's config file
HF_CONFIG = "config.json"


def hf_names(c) -> list[str]:
  """The HF names of the model's tensors, in params_to_hf's order."""
  names = ["model.embed_tokens.weight"]
  for i in range(c.n_layers):
    kind = _layer_slot(c, i)[2]
    names += [f"model.layers.{i}.{suffix}" for suffix, *_ in _layer_map(c, _family(c), kind)]
  return names + ["model.norm.weight"] + ([] if c.tie_embeddings else ["lm_head.weight"])


def params_to_hf(params, c) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 [out, in] tensor) pairs, one at a time."""
  f32 = lambda x: np.asarray(x, np.float32)
  yield "model.embed_tokens.weight", f32(params["embedding"])
  for i in range(c.n_layers):
    block, stack, kind = _layer_slot(c, i)
    for suffix, path, index, _, to_hf in _layer_map(c, _family(c), kind):
      x = params
      for p in block + path:
        x = x[p]
      yield f"model.layers.{i}.{suffix}", np.ascontiguousarray(to_hf(f32(x[(*stack, *index)])))
  yield "model.norm.weight", f32(params["final_norm"]["scale"])
  if not c.tie_embeddings:
    yield "lm_head.weight", np.ascontiguousarray(f32(params["unembed"]).T)


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path,
                      max_shard_bytes: int = 2 * 2**30, filename: str = "model.safetensors") -> None:
  """Writes shards of at most `max_shard_bytes` (one tensor may exceed it) plus an index;
  only the shard being filled is held in memory. One shard is named `filename`."""
  from safetensors.numpy import save_file
  shard_names: list[list[str]] = []  # tensor names of each written shard
  current: dict[str, np.ndarray] = {}
  total = 0

  def flush():
    save_file(current, str(out_dir / f"shard-{len(shard_names):05d}.tmp"), metadata={"format": "pt"})
    shard_names.append(list(current))
    current.clear()

  for name, x in tensors:
    if current and sum(v.nbytes for v in current.values()) + x.nbytes > max_shard_bytes:
      flush()
    current[name] = x
    total += x.nbytes
  flush()
  n = len(shard_names)
  umask = os.umask(0)
  os.umask(umask)

  def publish(tmp: str, final: str) -> None:  # readable like any file the user writes
    os.chmod(out_dir / tmp, 0o666 & ~umask)
    os.replace(out_dir / tmp, out_dir / final)

  if n == 1:
    publish("shard-00000.tmp", filename)
    return
  weight_map = {}
  for i, names in enumerate(shard_names):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    publish(f"shard-{i:05d}.tmp", final)
    weight_map.update({name: final for name in names})
  (out_dir / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ----------------------------------------------------------------------------- PEFT LoRA

# model.lora target -> (our module path in a layer, the HF module it adapts)
PEFT_MODULES = {"q": (("attn", "q"), "self_attn.q_proj"), "k": (("attn", "k"), "self_attn.k_proj"),
                "v": (("attn", "v"), "self_attn.v_proj"), "o": (("attn", "o"), "self_attn.o_proj"),
                "gate": (("mlp", "gate"), "mlp.gate_proj"), "up": (("mlp", "up"), "mlp.up_proj"),
                "down": (("mlp", "down"), "mlp.down_proj")}
PEFT_PREFIX = "base_model.model.model.layers"


def peft_config(c, base_model: str = "") -> dict:
  """adapter_config.json of a LoRA run, as peft writes it."""
  from llm.model.lora import targets
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.lora.rank,
          "lora_alpha": c.lora.alpha, "lora_dropout": c.lora.dropout, "bias": "none",
          "target_modules": sorted(PEFT_MODULES[t][1].split(".")[-1] for t in targets(c)),
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
          "base_model_name_or_path": base_model or None}


def _peft_layers(c):
  """(layer index, target, our block path, stacked index, HF module) for each adapter."""
  from llm.model.lora import targets
  for i in range(c.n_layers):
    block, stack, kind = _layer_slot(c, i)
    for t in targets(c):
      ours, module = PEFT_MODULES[t]
      if ours[0] == "mlp" and kind != "dense":
        raise ValueError(f"model.lora.targets has {t!r} but layer {i} is a MoE layer; "
                         "LoRA adapts dense projections only")
      yield i, block + ours, stack, module


def adapters_to_peft(params, c) -> Iterator[tuple[str, np.ndarray]]:
  """(PEFT tensor name, [r, in] lora_A or [out, r] lora_B) of a LoRA run's adapters."""
  f32 = lambda x: np.asarray(x, np.float32)
  for i, path, index, module in _peft_layers(c):
    node = params
    for p in path:
      node = node[p]
    a, b = f32(node["lora_a"][index]), f32(node["lora_b"][index])
    r = a.shape[-1]
    name = f"{PEFT_PREFIX}.{i}.{module}"
    yield f"{name}.lora_A.weight", np.ascontiguousarray(a.reshape(-1, r).T)
    yield f"{name}.lora_B.weight", np.ascontiguousarray(b.reshape(r, -1).T)


def _linear_features(c) -> dict[str, tuple[int, int]]:
  """(in_features, out_features) of each LoRA target as an HF Linear."""
  from llm.config import head_dim
  d, e, f = c.d_model, head_dim(c), c.d_ff
  return {"q": (d, c.n_heads * e), "k": (d, c.n_kv_heads * e), "v": (d, c.n_kv_heads * e),
          "o": (c.n_heads * e, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def merge_peft(params, c, peft_dir) -> dict:
  """Our (numpy) params with a PEFT LoRA adapter directory folded into the kernels."""
  peft_dir = Path(peft_dir)
  config_path = peft_dir / "adapter_config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} does not exist: is {peft_dir} a PEFT adapter?")
  pc = json.loads(config_path.read_text())
  if pc.get("peft_type") != "LORA" or pc.get("use_dora") or pc.get("use_rslora"):
    raise ValueError(f"{config_path}: only plain LoRA adapters are supported (peft_type LORA, "
                     f"no DoRA, no rsLoRA); got {pc.get('peft_type')!r}")
  weights_path = peft_dir / "adapter_model.safetensors"
  if not weights_path.is_file():
    raise FileNotFoundError(f"{weights_path} does not exist")
  rank, alpha = pc.get("r"), pc.get("lora_alpha")
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"{config_path}: 'r'={rank!r} must be an integer >= 1 (the LoRA rank)")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
    raise ValueError(f"{config_path}: 'lora_alpha'={alpha!r} must be a finite number")
  tensors = load_safetensors(weights_path)
  scale = float(alpha) / float(rank)
  by_module = {module: t for t, (_, module) in PEFT_MODULES.items()}
  merged = 0
  for name, a in tensors.items():
    if not name.endswith(".lora_A.weight"):
      continue
    stem = name[:-len(".lora_A.weight")]
    match = re.search(r"\.layers\.(\d+)\.(.+)$", stem)
    if match is None:
      raise ValueError(f"{weights_path}: {name!r} names no decoder layer (…layers.N.MODULE)")
    i, module = int(match.group(1)), match.group(2)
    if module not in by_module:
      raise ValueError(f"{weights_path}: adapter on {module!r} has no counterpart here; "
                       f"supported: {sorted(by_module)}")
    if i >= c.n_layers:
      raise ValueError(f"{weights_path}: {name!r} adapts layer {i}, but the base model has "
                       f"{c.n_layers} layers (0..{c.n_layers - 1})")
    block, index, _ = _layer_slot(c, i)
    node = params
    for p in block + PEFT_MODULES[by_module[module]][0]:
      node = node[p]
    kernel = node["kernel"]
    if f"{stem}.lora_B.weight" not in tensors:
      raise ValueError(f"{weights_path}: {name!r} has no matching {stem}.lora_B.weight")
    b = tensors[f"{stem}.lora_B.weight"]
    n_in, n_out = _linear_features(c)[by_module[module]]
    if a.ndim != 2 or b.ndim != 2 or a.shape != (rank, n_in) or b.shape != (n_out, rank):
      raise ValueError(f"{weights_path}: {stem} has lora_A {list(a.shape)} and lora_B "
                       f"{list(b.shape)}; this base model and r={rank} need "
                       f"[{rank}, {n_in}] and [{n_out}, {rank}]")
    delta = scale * (b.astype(np.float32) @ a.astype(np.float32))  # [out, in]
    kernel[index] += delta.T.reshape(kernel.shape[len(index):]).astype(kernel.dtype)
    merged += 1
  if not merged:
    raise ValueError(f"{weights_path} holds no lora_A/lora_B tensors")
  return params
