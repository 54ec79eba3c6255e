"""Qwen2.5-7B shapes: 28 layers, GQA 28/4 with head dim 128, biases on q/k/v, RoPE base
1M, untied 152,064-token vocabulary: 7,615,616,512 parameters. For contexts past 32k,
Qwen's YaRN: --config.model.rope_scaling.type=yarn, factor=4.0, original_max_position=32768."""

from llm.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                 d_ff=18944, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True)
  c.data.update(seq_len=4096)
  c.train.update(batch_size=256)
  return c
