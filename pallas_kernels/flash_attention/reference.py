"""Plain float32 attention under the kernels' masking convention: the test reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.common import attention_mask


def reference_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, kv_segment_ids_BS=None, *,
                        causal=True, window=None, scale=None, q_offset=0, kv_offset=0,
                        softcap=None):
  """Returns (out_BTHE float32, lse_BHT float32); rows that see nothing give 0 and -inf."""
  b, t, h, e = q_BTHE.shape
  s, k = k_BSKE.shape[1], k_BSKE.shape[2]
  scale = e ** -0.5 if scale is None else scale
  q_seg = jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT
  kv_seg = q_seg if kv_segment_ids_BS is None else kv_segment_ids_BS
  q_pos_1T1 = q_offset + jnp.arange(t)[None, :, None]
  kv_pos_11S = kv_offset + jnp.arange(s)[None, None, :]
  mask_BTS = attention_mask(q_pos_1T1, kv_pos_11S, q_seg[:, :, None], kv_seg[:, None, :],
                            causal=causal, window=window)
  k_BSHE = jnp.repeat(k_BSKE.astype(jnp.float32), h // k, axis=2)
  v_BSHE = jnp.repeat(v_BSKE.astype(jnp.float32), h // k, axis=2)
  logits_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE.astype(jnp.float32), k_BSHE) * scale
  if softcap is not None:
    logits_BHTS = softcap * jnp.tanh(logits_BHTS / softcap)
  logits_BHTS = jnp.where(mask_BTS[:, None], logits_BHTS, -1e30)
  seen_B1T = jnp.any(mask_BTS, axis=-1)[:, None]
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1) * seen_B1T[..., None]
  lse_BHT = jnp.where(seen_B1T, jax.nn.logsumexp(logits_BHTS, axis=-1), -jnp.inf)
  return jnp.einsum("bhts,bshe->bthe", probs_BHTS, v_BSHE), lse_BHT
