"""Supervised fine-tuning data: chat templates and token ids against transformers'
apply_chat_template, assistant masks against transformers and hand-built ones, formats,
packing, tokenizer.json parity, and a short SFT run."""

import json

import jax
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm import config as config_lib
from llm.data import chat, sft
from llm.data.tokenizer import open_tokenizer, train_tokenizer
from llm.train import train
from tests.helpers import ROOT, losses, tiny_config

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Qwen's ChatML template as shipped: no {% generation %} blocks
QWEN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
               "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "
               "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 30 + 3, in words?"},
    {"role": "assistant", "content": "Thirty-three, I think."},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  """(transformers fast tokenizer, ours) over one byte-level BPE tokenizer.json."""
  rust = RustTokenizer(models.BPE())
  rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  rust.decoder = decoders.ByteLevel()
  rust.train_from_iterator([(ROOT / "README.md").read_text()] * 2, trainers.BpeTrainer(
      vocab_size=700, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token=SPECIALS[0],
                                              eos_token=SPECIALS[1])
  fast.chat_template = QWEN_CHATML
  out = tmp_path_factory.mktemp("hf_tok")
  fast.save_pretrained(out)
  return fast, open_tokenizer(out / "tokenizer.json")


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_builtin_templates_match_transformers_ids_and_assistant_masks(hf_tokenizer, name):
  fast, ours = hf_tokenizer
  ref = fast.apply_chat_template(CONVERSATION, chat_template=chat.TEMPLATES[name],
                                 tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
  ids, mask = chat.tokenize_chat(ours, chat.TEMPLATES[name], CONVERSATION)
  assert list(ids) == list(ref["input_ids"])
  assert list(mask.astype(int)) == list(ref["assistant_masks"])
  text, _ = chat.render(chat.TEMPLATES[name], CONVERSATION, chat.special_token_vars(ours))
  assert text == fast.apply_chat_template(CONVERSATION, chat_template=chat.TEMPLATES[name],
                                          tokenize=False)


def _hand_built_mask(ours, ids, contents, end_token: str):
  """True exactly on each assistant content's own tokens and the end-of-turn token."""
  eot = ours.special_tokens[end_token]
  expected = np.zeros(len(ids), bool)
  pos = 0
  for content in contents:
    piece = list(ours.encode(content)) + [eot]
    while list(ids[pos:pos + len(piece)]) != piece:
      pos += 1
      assert pos < len(ids), f"{content!r} not found"
    expected[pos:pos + len(piece)] = True
    pos += len(piece)
  return expected


def test_tokenizer_own_template_without_generation_blocks(hf_tokenizer):
  """The tokenizer.json's chat_template (no {% generation %}): ids equal transformers',
  the mask is each assistant content plus its <|im_end|>, located by prefix rendering."""
  fast, ours = hf_tokenizer
  assert ours.chat_template == QWEN_CHATML
  template = chat.template_for(tiny_config().data.chat, ours)
  ids, mask = chat.tokenize_chat(ours, template, CONVERSATION)
  assert list(ids) == list(fast.apply_chat_template(CONVERSATION, tokenize=True,
                                                    return_dict=True)["input_ids"])
  contents = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
  np.testing.assert_array_equal(mask, _hand_built_mask(ours, ids, contents, "<|im_end|>"))
  _, last = chat.tokenize_chat(ours, template, CONVERSATION, loss_on="last")
  np.testing.assert_array_equal(last, _hand_built_mask(ours, ids, contents[-1:], "<|im_end|>"))
  _, every = chat.tokenize_chat(ours, template, CONVERSATION, loss_on="all")
  assert every.all()


def test_hf_tokenizer_ids_equal_transformers(hf_tokenizer):
  fast, ours = hf_tokenizer
  text = "Hello <|im_start|>world\n  indented code(x) = 3 ünïcode <|eot_id|>"
  assert ours.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
  assert ours.bos_id == fast.bos_token_id and ours.eos_id == fast.eos_token_id
  ids, offsets = ours.encode_with_offsets(text)
  ref = fast(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
  assert ids == ours.encode(text) and offsets == [tuple(o) for o in ref]


def test_sentencepiece_gets_template_tokens_as_single_pieces(tmp_path):
  docs = ["What is two plus two? Four. " * 50, "Reverse abc: cba. " * 50]
  tok = train_tokenizer(docs, 300, tmp_path / "sp.model",
                        user_defined_symbols=chat.TEMPLATE_TOKENS["chatml"])
  ids, mask = chat.tokenize_chat(tok, chat.CHATML, CONVERSATION[1:3])
  im_start, im_end = (tok.special_tokens[s] for s in chat.TEMPLATE_TOKENS["chatml"])
  assert list(ids).count(im_start) == 2 and list(ids).count(im_end) == 2
  assert ids[mask][-1] == im_end and tok.decode(ids[mask][:-1]).strip() == "It is 4."
  # mistral: "<s>" / "</s>" in the rendered text are the control tokens, not characters
  ids, mask = chat.tokenize_chat(tok, chat.MISTRAL, CONVERSATION[1:3])
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1]
  assert tok.decode(ids[mask][:-1]).strip() == "It is 4."


@pytest.mark.parametrize("record,expected", [
    ({"instruction": "Add", "input": "2 and 3", "output": "5"},
     [("user", "Add\n\n2 and 3"), ("assistant", "5")]),
    ({"instruction": "Say hi", "output": "hi", "system": "Be nice"},
     [("system", "Be nice"), ("user", "Say hi"), ("assistant", "hi")]),
    ({"prompt": "2+2=", "completion": "4"}, [("user", "2+2="), ("assistant", "4")]),
    ({"prompt": [{"role": "user", "content": "q"}],
      "completion": [{"role": "assistant", "content": "a"}]}, [("user", "q"), ("assistant", "a")]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     [("user", "q"), ("assistant", "a")]),
])
def test_formats_become_messages(record, expected):
  assert [(m["role"], m["content"]) for m in chat.to_messages(record)] == expected


def test_chat_objectives_need_jsonl_paths():
  cfg = tiny_config()
  cfg.train.objective = "sft"
  cfg.data.paths = ""
  with pytest.raises(ValueError, match="train.objective='sft' reads chat examples from JSONL"):
    config_lib.validate(cfg)


def test_bad_examples_are_named():
  with pytest.raises(ValueError, match=r"f.jsonl:3: keys \['text'\] match no chat format"):
    chat.to_messages({"text": "x"}, "f.jsonl:3")
  with pytest.raises(ValueError, match="message 0 has role 'robot'"):
    chat.to_messages({"messages": [{"role": "robot", "content": "x"}]})


def test_packing_keeps_examples_apart_and_shifts_the_mask():
  ids = [np.array([5, 6, 7, 8]), np.array([9, 10, 11]), np.array([12, 13, 14, 15, 16])]
  masks = [np.array([0, 0, 1, 1], bool), np.array([0, 1, 1], bool), np.array([0, 0, 0, 1, 1], bool)]
  rows = sft.pack(ids, masks, seq_len=6)
  # 3 + 2 predictions fit one row of 6; the third example (4) starts a new row
  np.testing.assert_array_equal(rows["inputs"], [[5, 6, 7, 9, 10, 0], [12, 13, 14, 15, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[6, 7, 8, 10, 11, 0], [13, 14, 15, 16, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])


def _write_examples(path, n, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      word = "".join(rng.choice(list("abcdefgh"), rng.integers(2, 5)))
      f.write(json.dumps({"prompt": f"Reverse {word}", "completion": word[::-1]}) + "\n")


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, hf_tokenizer):
  _, ours = hf_tokenizer
  convs = [[{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok"}]
           for n in (2, 200)]
  cfg = tiny_config().data
  cfg.update(seq_len=32)
  cfg.chat.template = "chatml"
  kept = sft.tokenize_examples(convs, ours, cfg)
  assert (kept.truncated, kept.dropped, len(kept.ids)) == (0, 1, 1)  # truncated before the answer
  cfg.chat.overlong = "drop"
  assert sft.tokenize_examples(convs, ours, cfg).dropped == 1
  long_answer = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok " * 50}]]
  cfg.chat.overlong = "truncate"
  t = sft.tokenize_examples(long_answer, ours, cfg)
  assert t.truncated == 1 and len(t.ids[0]) == 33


def test_assistant_turns_with_weight_0_are_not_trained_on(hf_tokenizer):
  """OpenAI's format: "weight": 0 on an assistant message leaves it out of the loss."""
  _, ours = hf_tokenizer
  template = chat.template_for(config_lib.base_config().data.chat, ours)  # QWEN_CHATML
  weighted = [dict(m) for m in CONVERSATION]
  assistant = [i for i, m in enumerate(weighted) if m["role"] == "assistant"]
  assert len(assistant) == 2
  weighted[assistant[0]]["weight"] = 0
  weighted[assistant[1]]["weight"] = 1
  ids_w, mask_w = chat.tokenize_chat(ours, template, chat.to_messages({"messages": weighted}))
  ids_last, mask_last = chat.tokenize_chat(ours, template, CONVERSATION, "last")
  _, mask_all = chat.tokenize_chat(ours, template, CONVERSATION, "assistant")
  np.testing.assert_array_equal(ids_w, ids_last)
  np.testing.assert_array_equal(mask_w, mask_last)  # the weight-0 turn is out of the loss
  assert mask_all.sum() > mask_w.sum() > 0
  bad = [dict(CONVERSATION[1]), dict(CONVERSATION[2], weight=0.5)]
  with pytest.raises(ValueError, match=r"message 1 has 'weight': 0.5; .* 0 .* or 1"):
    chat.to_messages({"messages": bad}, "ex")


def test_sft_run_learns_the_assistant_tokens_only(config, tmp_path):
  _write_examples(tmp_path / "train.jsonl", 300)
  config.train.update(objective="sft", steps=12, eval_every=12, checkpoint_every=12,
                      z_loss=0.0)
  config.data.update(source="jsonl", paths=str(tmp_path / "train.jsonl"), seq_len=64,
                     tokenizer_path="")
  config.data.chat.template = "chatml"
  config.model.vocab_size = 300
  config.optim.update(lr=3e-3, warmup_steps=2)
  train(config, tmp_path / "run", devices=jax.devices()[:1])
  curve = losses(tmp_path / "run")
  assert curve[12] < curve[1]
  tok = open_tokenizer(tmp_path / "run" / "tokenizer.model")
  assert "<|im_start|>" in tok.special_tokens  # the template's tokens, trained in
