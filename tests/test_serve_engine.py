"""The serving engine (llm.serve) against independent references: every request's greedy
tokens equal transformers' `generate` for that prompt alone, though requests arrive at
random steps on a small page pool (chunked prefill, shared prefixes, preemption); a
seeded sampled request gives the same tokens alone and in a crowd; no page leaks."""

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llm.convert.__main__ import hf_to_llm  # noqa: E402
from llm.serve.async_engine import AsyncEngine  # noqa: E402
from llm.serve.engine import Engine  # noqa: E402
from llm.serve.request import SamplingOptions  # noqa: E402
from llm.workdir import load_params  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
  """A random fp32 HF Llama (GQA), the same weights imported with hf-to-llm, and its
  directory."""
  root = tmp_path_factory.mktemp("serve")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # sharper logits than at init, so greedy ties cannot hide a bug
    for p in model.parameters():
      p.mul_(4.0 if p.ndim == 2 else 1.0)
  model.save_pretrained(root / "hf")
  hf_to_llm(str(root / "hf"), str(root / "ours"))
  config, params = load_params(root / "ours")
  return model, config, params, root / "hf"


def _hf_greedy(model, prompt, n):
  out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _engine(config, params, **kw):
  kw = {**dict(page_size=4, num_pages=40, max_num_batched_tokens=24, max_num_seqs=6,
              max_model_len=96, buckets=(8, 24)), **kw}
  return Engine(config.model, params, **kw)


def test_greedy_tokens_equal_transformers_under_chunking_sharing_and_preemption(hf_and_ours):
  model, config, params, _ = hf_and_ours
  rng = np.random.default_rng(0)
  system = rng.integers(1, VOCAB, 22).tolist()  # a shared prefix: 5 full pages
  prompts = []
  for i in range(14):
    body = rng.integers(1, VOCAB, int(rng.integers(1, 30))).tolist()
    prompts.append((system + body) if i % 2 else body)
  lengths = rng.integers(4, 20, len(prompts)).tolist()
  arrivals = sorted(rng.integers(0, 30, len(prompts)).tolist())
  engine = _engine(config, params)
  got: dict[str, list[int]] = {}
  ids = {}
  step = 0
  finished = set()
  while len(finished) < len(prompts):
    for i, at in enumerate(arrivals):
      if at == step:
        ids[engine.add_request(prompts[i], SamplingOptions(max_tokens=lengths[i],
                                                           temperature=0.0))] = i
    for out in engine.step():
      got.setdefault(out.request_id, [])
      got[out.request_id] += out.outputs[0].token_ids
      assert out.outputs[0].finish_reason in (None, "length")
      if out.finished:
        finished.add(out.request_id)
    step += 1
    engine.pool.check()
    assert step < 500
  m = engine.metrics()
  assert m["preemptions"] > 0 and m["prefix_cache_hit_tokens"] > 0  # the pool was tight
  assert m["pages_used"] == 0  # nothing leaked: every page free or an evictable prefix
  for rid, i in ids.items():
    assert got[rid] == _hf_greedy(model, prompts[i], lengths[i]), f"prompt {i}"


def test_seeded_samples_do_not_depend_on_the_batch_and_abort_frees_pages(hf_and_ours):
  _, config, params, _ = hf_and_ours
  options = SamplingOptions(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7,
                            presence_penalty=0.5, logprobs=3)
  prompt = [5, 9, 17, 33, 2, 8]

  def alone():
    engine = _engine(config, params, warm_up=False)
    rid = engine.add_request(prompt, options)
    out = []
    while engine.has_unfinished():
      for o in engine.step():
        assert o.request_id == rid
        out += o.outputs[0].token_ids
        assert len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids)
    return out

  engine = _engine(config, params, warm_up=False)
  rng = np.random.default_rng(1)
  others = [engine.add_request(rng.integers(1, VOCAB, 9).tolist(),
                               SamplingOptions(max_tokens=15, temperature=1.0))
            for _ in range(4)]
  engine.step()
  rid = engine.add_request(prompt, options)
  crowd = []
  steps = 0
  while engine.has_unfinished():
    for o in engine.step():
      if o.request_id == rid:
        crowd += o.outputs[0].token_ids
    steps += 1
    if steps == 3:
      engine.abort(others[0])  # freed at once
      engine.pool.check()
  assert crowd == alone() and len(crowd) == 12
  assert engine.metrics()["pages_used"] == 0


def test_async_engine_streams_n_samples_sharing_the_prompt_and_aborts_when_left(hf_and_ours):
  _, config, params, _ = hf_and_ours
  engine = _engine(config, params, warm_up=False)
  runner = AsyncEngine(engine)
  prompt = list(range(1, 19))  # 4 full pages

  async def run():
    outs = []
    async for out in runner.generate(prompt, SamplingOptions(max_tokens=5, temperature=1.0,
                                                             n=3, seed=3)):
      outs.append(out)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # refused, not queued
      async for _ in runner.generate([VOCAB], SamplingOptions()):
        pass
    # a caller that leaves mid-stream: its request is aborted and its pages freed
    async for _ in runner.generate(prompt, SamplingOptions(max_tokens=50, ignore_eos=True)):
      break
    for _ in range(100):
      await asyncio.sleep(0.05)
      if not runner.in_flight and not engine.has_unfinished():
        break
    return outs

  outs = asyncio.run(run())
  runner.shutdown()
  assert outs[-1].finished
  per_sample = [sum((o.outputs[i].token_ids for o in outs), []) for i in range(3)]
  assert all(len(s) == 5 for s in per_sample) and len({tuple(s) for s in per_sample}) > 1
  # samples 2 and 3 forked from the first at the prompt's end: the prompt ran once
  assert engine.counters["forked_samples"] == 2
  assert engine.metrics()["pages_used"] == 0


def test_samples_fork_from_the_first_as_rows_and_pages_allow(hf_and_ours):
  """n samples of a prompt fork from the first at its last position (the prompt runs
  once); those that find no free row wait and reuse the cached prompt pages instead.
  Either way a seeded sample's tokens are those of the same sample with room for all."""
  _, config, params, _ = hf_and_ours
  prompt = list(range(1, 19))
  options = SamplingOptions(max_tokens=6, temperature=1.0, n=5, seed=11, ignore_eos=True)
  roomy = _engine(config, params, warm_up=False)
  tight = _engine(config, params, warm_up=False, max_num_seqs=3)
  outs = {}
  for name, engine in (("roomy", roomy), ("tight", tight)):
    (out,) = engine.generate([prompt], [options])
    outs[name] = [s.token_ids for s in out.outputs]
    assert engine.metrics()["pages_used"] == 0
    engine.pool.check()
  assert roomy.counters["forked_samples"] == 4 and tight.counters["forked_samples"] == 2
  assert tight.pool.hit_tokens >= 2 * 16  # the two that waited found the prompt's pages
  assert outs["tight"] == outs["roomy"] and len({tuple(t) for t in outs["roomy"]}) > 1


def test_forked_samples_follow_the_models_distribution(hf_and_ours):
  """The first tokens of many samples (forked ones drawn from the first's logits, each
  with its own key, and ones that reran the prompt's last page) follow transformers' next-token distribution, here truncated to
  its top 8 at temperature 0.8: a chi-square test over 8 x 128 draws (critical value at
  p = 0.001 for 7 degrees of freedom: 24.32)."""
  model, config, params, _ = hf_and_ours
  prompt = list(range(5, 27))
  with torch.no_grad():
    logits = model(torch.tensor([prompt])).logits[0, -1].double() / 0.8
  top = torch.topk(logits, 8)
  expected = torch.softmax(top.values, -1).numpy()
  engine = _engine(config, params, warm_up=False, max_num_seqs=32, num_pages=64)
  outs = engine.generate([prompt] * 8, [SamplingOptions(max_tokens=1, temperature=0.8,
                                                        top_k=8, n=128, seed=1000 * i,
                                                        ignore_eos=True) for i in range(8)])
  drawn = [s.token_ids[0] for out in outs for s in out.outputs]
  # the first rows' worth forked; the rest waited for rows and reused the cached prompt
  assert engine.counters["forked_samples"] >= 24 and engine.pool.hit_tokens > 0
  ids = top.indices.tolist()
  assert set(drawn) <= set(ids)  # nothing outside the top 8
  counts = np.asarray([drawn.count(i) for i in ids])
  chi2 = float(((counts - len(drawn) * expected) ** 2 / (len(drawn) * expected)).sum())
  assert chi2 < 24.32, (chi2, counts, expected)


def _full_forward_greedy(model, params, prompt, n):
  """Greedy continuation by full forwards over what precedes each token (no cache)."""
  import jax
  import jax.numpy as jnp
  apply = jax.jit(model.apply)
  seq = list(prompt)
  for _ in range(n):  # right-padded to one length (causal: padding cannot reach back)
    logits = apply({"params": params}, jnp.asarray([seq + [0] * (64 - len(seq))]))
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_sliding_window_and_moe_models_take_the_same_path(tokenizer_path):
  """A windowed model with MoE layers: greedy tokens equal full forwards', and a stop
  string ends the text where it first appears, the text streamed in held-back pieces."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from llm.data.tokenizer import open_tokenizer
  from llm.model import make_model
  from tests.helpers import tiny_config
  cfg = tiny_config()
  cfg.model.update(mlp="moe", n_layers=2, sliding_window=5)
  cfg.model.moe.update(n_experts=4, top_k=2, d_ff=32, every=2)
  model = make_model(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 2 else x, params)
  tok = open_tokenizer(tokenizer_path)
  engine = Engine(cfg.model, params, tok, page_size=4, num_pages=24, max_num_batched_tokens=16,
                  max_num_seqs=4, max_model_len=64, buckets=(16,), warm_up=False)
  prompts = [tok.bos_prefix() + list(tok.encode(t)) for t in ("def main():", "import os\n")]
  rids = [engine.add_request(p, SamplingOptions(max_tokens=14, temperature=0.0, ignore_eos=True))
          for p in prompts]
  got = {rid: [] for rid in rids}
  while engine.has_unfinished():
    for out in engine.step():
      got[out.request_id] += out.outputs[0].token_ids
  for rid, prompt in zip(rids, prompts):
    assert got[rid] == _full_forward_greedy(model, params, prompt, 14)
  full_text = tok.decode(got[rids[0]])
  stop = full_text[len(full_text) // 2:len(full_text) // 2 + 2]
  assert stop.strip(), full_text
  rid = engine.add_request(prompts[0], SamplingOptions(max_tokens=14, temperature=0.0,
                                                       ignore_eos=True, stop=(stop,)))
  pieces, reason = [], None
  while engine.has_unfinished():
    for out in engine.step():
      pieces.append(out.outputs[0].text)
      reason = out.outputs[0].finish_reason
  assert "".join(pieces) == full_text[:full_text.find(stop)] and reason == "stop"
  with pytest.raises(ValueError, match=r"exceed max_model_len=64"):
    engine.add_request(prompts[0], SamplingOptions(max_tokens=60))
  with pytest.raises(ValueError, match=r"prompt token ids \[999\] are outside the vocabulary"):
    engine.add_request([1, 999])
  with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
    SamplingOptions(top_p=0)
  assert engine.metrics()["pages_used"] == 0


def test_an_engine_straight_from_a_hugging_face_directory(hf_and_ours):
  model, _, _, hf_dir = hf_and_ours
  engine = Engine.from_hf(hf_dir, page_size=4, num_pages=40, max_num_batched_tokens=24,
                          max_num_seqs=2, max_model_len=96, buckets=(24,), warm_up=False)
  prompt = [7, 3, 11, 19, 23]
  rid = engine.add_request(prompt, SamplingOptions(max_tokens=6, temperature=0.0))
  got = []
  while engine.has_unfinished():
    for o in engine.step():
      assert o.request_id == rid
      got += o.outputs[0].token_ids
  assert got == _hf_greedy(model, prompt, 6)


def test_a_tensor_parallel_mesh_gives_the_same_tokens(hf_and_ours):
  import jax
  import ml_collections

  from llm.parallel.mesh import make_mesh
  _, config, params, _ = hf_and_ours
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=4, expert=1, fsdp=1, tensor=2,
                                                  sequence=1)), jax.devices()[:8])
  prompts = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 4, 5, 23, 53]]
  outs = []
  for m in (None, mesh):
    engine = _engine(config, params, warm_up=False, mesh=m)
    rids = [engine.add_request(p, SamplingOptions(max_tokens=10, temperature=0.0))
            for p in prompts]
    got = {r: [] for r in rids}
    while engine.has_unfinished():
      for o in engine.step():
        got[o.request_id] += o.outputs[0].token_ids
    outs.append([got[r] for r in rids])
  assert engine.runner.pages[0]["kv"].sharding.spec[2] == "tensor"  # KV pages split by head
  assert outs[0] == outs[1]


def test_lora_adapters_share_a_batch_and_each_equals_its_merged_model():
  """Two adapters of different ranks and targets over one base, their requests and the
  base's interleaved in the same steps (sharing one prompt, which must not share pages
  across adapters): each request's greedy tokens equal those of its adapter merged into
  the base and served alone."""
  import jax

  from llm.model import init_params, lora, make_model, unbox
  from tests.helpers import tiny_config
  base_cfg = tiny_config()
  base = unbox(init_params(make_model(base_cfg.model), jax.random.key(0), 8))
  base = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, base)  # sharper logits
  named = {}
  for i, (name, rank, targets) in enumerate((("terse", 2, "q,v"),
                                              ("chatty", 4, "q,k,v,o,gate,up,down"))):
    cfg = tiny_config()
    cfg.model.lora.update(rank=rank, alpha=2.0 * rank, targets=targets)
    adapted = unbox(init_params(make_model(cfg.model), jax.random.key(10 + i), 8))
    adapters = jax.tree.map(lambda x, k=i: x + 0.5 * jax.random.normal(
        jax.random.key(20 + k), x.shape), lora.split(adapted)[1])  # lora_b is 0 at init
    named[name] = (cfg.model, lora.join(base, adapters))
  prompt = [5, 17, 3, 99, 42, 7, 250, 11, 64, 8]
  options = SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)
  kw = dict(page_size=4, num_pages=40, max_num_batched_tokens=24, max_num_seqs=6,
            max_model_len=64, buckets=(8, 24), warm_up=False)

  def alone(model_cfg, params):
    engine = Engine(model_cfg, params, **kw)
    rid = engine.add_request(prompt, options)
    out = []
    while engine.has_unfinished():
      out += [t for o in engine.step() if o.request_id == rid for t in o.outputs[0].token_ids]
    return out

  expected = {"": alone(base_cfg.model, base)}
  for name, (cfg, params) in named.items():
    merged, merged_cfg = lora.merge(params, cfg)
    expected[name] = alone(merged_cfg, merged)
  assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the output

  engine = Engine(base_cfg.model, base, adapters=named, **kw)
  rids = {engine.add_request(prompt, options, adapter=name): name
          for name in ("terse", "", "chatty", "terse")}
  got = {rid: [] for rid in rids}
  while engine.has_unfinished():
    for out in engine.step():
      got[out.request_id] += out.outputs[0].token_ids
  for rid, name in rids.items():
    assert got[rid] == expected[name], name
  with pytest.raises(ValueError, match="no adapter 'nope'; served: \\['chatty', 'terse'\\]"):
    engine.add_request(prompt, options, adapter="nope")
  bad = tiny_config()
  bad.model.update(d_model=32)
  bad.model.lora.update(rank=2)
  with pytest.raises(ValueError, match="model.d_model 32 vs 64 served"):
    Engine(base_cfg.model, base, adapters={"x": (bad.model, named["terse"][1])}, **kw)


def test_lora_runs_served_from_their_workdirs_over_the_base(config, tmp_path):
  """`Engine.from_workdir(base, loras={name: run})` (what `--lora NAME=WORKDIR` does):
  the adapter's greedy tokens equal its run loaded merged and served alone; a LoRA run of
  another base is refused."""
  import jax

  from llm.train import train
  config.train.update(steps=2, checkpoint_every=2, eval_every=2)
  train(config, tmp_path / "base", devices=jax.devices()[:1])
  config.model.lora.update(rank=2, targets="q,v,up")
  config.train.update(init_params=str(tmp_path / "base"))
  config.optim.update(lr=5e-2, warmup_steps=0, schedule="constant")
  train(config, tmp_path / "lora", devices=jax.devices()[:1])
  kw = dict(page_size=4, num_pages=40, max_num_batched_tokens=24, max_num_seqs=4,
            buckets=(8, 24), warm_up=False)
  options = SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)

  def greedy(engine, adapter=""):
    rid = engine.add_request("def main():", options, adapter=adapter)
    out = []
    while engine.has_unfinished():
      out += [t for o in engine.step() if o.request_id == rid for t in o.outputs[0].token_ids]
    return out

  served = Engine.from_workdir(tmp_path / "base", loras={"mine": tmp_path / "lora"}, **kw)
  assert greedy(served, "mine") == greedy(Engine.from_workdir(tmp_path / "lora", **kw))
  assert greedy(served) == greedy(Engine.from_workdir(tmp_path / "base", **kw))
  with pytest.raises(ValueError, match="was trained on .*base.*not on the served"):
    Engine.load_adapter(tmp_path / "lora", tmp_path / "elsewhere")
  with pytest.raises(ValueError, match="is not a LoRA run"):
    Engine.load_adapter(tmp_path / "base")
