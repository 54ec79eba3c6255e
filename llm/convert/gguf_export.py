"""Export to GGUF, llama.cpp's file format (and Ollama's), with the `gguf` package.

    python -m llm.convert llm-to-gguf --workdir=DIR --out=model.gguf --type=f32|f16|q8_0

Llama-family models (Llama, Mistral without a sliding window, Qwen without biases): the
tensors go through the Hugging Face export (llm.convert.hf.params_to_hf, itself checked
against transformers) and are renamed as llama.cpp's convert_hf_to_gguf.py names them,
q and k permuted back from HF's rotary layout to the interleaved one llama.cpp uses.
Matrices are written in the chosen type, norms in f32 (as llama.cpp does). The
tokenizer travels in the file: a SentencePiece model as llama.cpp's "llama" vocabulary
(pieces, scores, types), a byte-level BPE tokenizer.json splitting with GPT-2's regex as
its "gpt2" vocabulary (tokens and merges; other pre-tokenizers are refused), with the
BOS/EOS ids and the chat template (the run's, else the tokenizer's own).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from llm.config import head_dim
from llm.convert import hf
from llm.data.chat import TEMPLATES
from llm.model import quant, require_lm_head
from llm.workdir import Workdir, load_params, load_tokenizer

# --type -> how matrices are stored
TYPES = ("f32", "f16", "q8_0")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
  if hf_name in _TOP_NAMES:
    return _TOP_NAMES[hf_name]
  _, _, layer, suffix = hf_name.split(".", 3)
  return f"blk.{layer}.{_LAYER_NAMES[suffix]}"


def _unrotate(w, n_heads: int):
  """HF's rotate-half q/k rows back to the interleaved pairs llama.cpp rotates."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def check_exportable(c) -> None:
  """A ValueError naming what GGUF's llama architecture cannot hold."""
  problems = []
  if c.mlp == "moe":
    problems.append("model.mlp='moe'")
  if c.sliding_window:
    problems.append(f"model.sliding_window={c.sliding_window}")
  if c.qk_norm:
    problems.append("model.qk_norm=True")
  if c.qkv_bias:
    problems.append("model.qkv_bias=True")
  if c.rope_scaling.type not in ("none", ""):
    problems.append(f"model.rope_scaling.type={c.rope_scaling.type!r}")
  if c.mla.kv_lora_rank:
    problems.append("model.mla (latent attention)")
  for name in ("post_norms", "norm_plus_one", "embed_scale", "attn_logit_softcap",
               "final_logit_softcap", "query_pre_attn_scalar", "mtp_layers"):
    if c[name]:
      problems.append(f"model.{name}={c[name]!r}")
  if c.mlp_activation != "silu":
    problems.append(f"model.mlp_activation={c.mlp_activation!r}")
  if problems:
    raise ValueError(f"llm-to-gguf writes dense Llama-family models; this one has "
                     f"{', '.join(problems)}")


def _tokenizer_fields(writer, tok, tok_path: Path, vocab_size: int) -> None:
  import gguf
  if tok_path.name.endswith(".model"):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
      tokens.append(sp.id_to_piece(i).encode())
      scores.append(float(sp.get_score(i)))
      types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                   gguf.TokenType.CONTROL if sp.is_control(i) else
                   gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
  else:
    spec = json.loads(tok_path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
      raise ValueError(f"{tok_path}: a {model.get('type')!r} tokenizer.json; llm-to-gguf "
                       "writes SentencePiece models and byte-level BPE ones")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
      vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens = [by_id.get(i, f"[PAD{i}]").encode() for i in range(max(by_id) + 1)]
    scores = [0.0] * len(tokens)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
      raise ValueError(f"{tok_path}: pre-tokenizer {json.dumps(pre)[:120]}; llm-to-gguf "
                       "writes byte-level BPE tokenizers that split with GPT-2's regex "
                       "(a ByteLevel pre-tokenizer), which llama.cpp knows as 'gpt-2'")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_merges(merges)
    bos, eos, unk = tok.bos_id, tok.eos_id, -1
  if len(tokens) > vocab_size:
    raise ValueError(f"{tok_path} has {len(tokens)} tokens, more than model.vocab_size="
                     f"{vocab_size}")
  for i in range(len(tokens), vocab_size):  # rows the embedding has beyond the tokenizer
    tokens.append(f"[PAD{i}]".encode())
    scores.append(0.0)
    types.append(gguf.TokenType.UNUSED)
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  for setter, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                        (writer.add_unk_token_id, unk)):
    if value is not None and value >= 0:
      setter(int(value))
  writer.add_add_bos_token(bos is not None and bos >= 0)
  writer.add_add_eos_token(False)


def llm_to_gguf(workdir: str, out: str, dtype: str = "f32") -> None:
  """Writes `out` (a new file; see the module docstring)."""
  if dtype not in TYPES:
    raise ValueError(f"--type={dtype!r}: allowed are {list(TYPES)}")
  out_path = Path(out)
  if out_path.exists():
    raise ValueError(f"--out={out!r} exists; llm-to-gguf writes a new file")
  try:
    import gguf
  except ImportError:
    raise ValueError("llm-to-gguf needs the gguf package: pip install 'llm[gguf]'") from None
  quant.require_float_weights(Workdir(workdir).read_config().model, workdir,
                              "export (--type=q8_0 quantizes for llama.cpp)")
  config, params = load_params(workdir)
  c = config.model
  require_lm_head(c, "export to GGUF")
  check_exportable(c)
  kind = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
  file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
  dim = head_dim(c)
  tmp = out_path.with_name(out_path.name + ".partial")
  writer = gguf.GGUFWriter(str(tmp), "llama")
  try:
    writer.add_name(Path(workdir).name)
    writer.add_context_length(int(config.data.seq_len))
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(file_type)
    tok_path = Workdir(workdir).tokenizer(config)
    if tok_path.is_file():
      tok = load_tokenizer(workdir, config)
      _tokenizer_fields(writer, tok, tok_path, c.vocab_size)
      # the run's template, else the tokenizer's own (chat.template_for, without its refusal)
      template = TEMPLATES.get(config.data.chat.template) or getattr(tok, "chat_template", None)
      if template:
        writer.add_chat_template(template)
    for name, w in hf.params_to_hf(jax.device_get(params), c):
      if name.endswith("q_proj.weight"):
        w = _unrotate(w, c.n_heads)
      elif name.endswith("k_proj.weight"):
        w = _unrotate(w, c.n_kv_heads)
      if w.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
        data, qtype = w.astype(np.float32), gguf.GGMLQuantizationType.F32
      elif kind == gguf.GGMLQuantizationType.F16:
        data, qtype = w.astype(np.float16), kind
      else:
        data, qtype = gguf.quants.quantize(w.astype(np.float32), kind), kind
      writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  print(f"wrote {out_path} ({dtype}, {out_path.stat().st_size / 2**20:.1f} MiB)")
