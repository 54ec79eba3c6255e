"""XLA paged attention (llm.ops.attention.paged) equals dense causal attention in NumPy:
ragged sequences in scattered pages, GQA, windows, prefill chunks, decode tokens and
padding in one flat batch."""

import jax.numpy as jnp
import numpy as np
import pytest

from llm.ops.attention.paged import paged_attention, write_pages


def _dense(q_HE, k_LKE, v_LKE, pos, window):
  h, e = q_HE.shape
  g = h // k_LKE.shape[1]
  keys = np.arange(pos + 1)
  if window:
    keys = keys[pos - keys < window]
  out = np.zeros((h, e))
  for head in range(h):
    s = k_LKE[keys, head // g] @ q_HE[head] / np.sqrt(e)
    p = np.exp(s - s.max())
    out[head] = (p / p.sum()) @ v_LKE[keys, head // g]
  return out


@pytest.mark.parametrize("window,keys_per_step", [(None, 0), (3, 0), (None, 4), (6, 8)])
def test_paged_attention_equals_dense_attention(window, keys_per_step):
  rng = np.random.default_rng(0)
  n, kh, h, e, num_pages = 4, 2, 4, 8, 16
  lengths = [5, 13, 9]
  keys = [rng.normal(size=(L, kh, e)).astype(np.float32) for L in lengths]
  values = [rng.normal(size=(L, kh, e)).astype(np.float32) for L in lengths]
  m = max(-(-L // n) for L in lengths)
  free = list(rng.permutation(np.arange(1, num_pages)))
  table = np.zeros((len(lengths), m), np.int32)  # padded with page 0
  for s, L in enumerate(lengths):
    table[s, :-(-L // n)] = [free.pop() for _ in range(-(-L // n))]
  # every key written through write_pages, the way an engine step writes its tokens
  seq = np.concatenate([np.full(L, s) for s, L in enumerate(lengths)])
  pos = np.concatenate([np.arange(L) for L in lengths])
  k_pages = jnp.zeros((num_pages, n, kh, e), jnp.float32)
  v_pages = jnp.zeros_like(k_pages)
  k_pages, v_pages = write_pages(k_pages, v_pages, jnp.asarray(np.concatenate(keys)),
                                 jnp.asarray(np.concatenate(values)),
                                 jnp.asarray(table[seq, pos // n]), jnp.asarray(pos % n))
  # a prefill of seq 0, one decode token of seq 1, a chunk of seq 2, and a padding token
  q_seq = np.array([0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 0], np.int32)
  q_pos = np.array([0, 1, 2, 3, 4, 12, 5, 6, 7, 8, -1], np.int32)
  q = rng.normal(size=(len(q_seq), h, e)).astype(np.float32)
  out = np.asarray(paged_attention(jnp.asarray(q), k_pages, v_pages, jnp.asarray(q_seq),
                                   jnp.asarray(q_pos), jnp.asarray(table), window=window,
                                   keys_per_step=keys_per_step))
  for t, (s, p) in enumerate(zip(q_seq, q_pos)):
    if p < 0:
      np.testing.assert_array_equal(out[t], 0.0)
      continue
    np.testing.assert_allclose(out[t], _dense(q[t], keys[s], values[s], p, window),
                               rtol=2e-5, atol=2e-5, err_msg=f"token {t}")
