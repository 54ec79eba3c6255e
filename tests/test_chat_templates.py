"""Assistant masks of chat templates without {% generation %} blocks, located in the one
full rendering (llm.data.chat), equal transformers' `return_assistant_tokens_mask` for
the same template with generation blocks around each assistant turn's content and end
token. Templates in the shapes of Llama-3, Qwen2.5 (ChatML, default system message),
Mistral v0.3 (the system message inside the last user turn), Phi-3 (EOS closing a
conversation without a generation prompt) and Gemma (no system role), written here since
nothing can be downloaded."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from llm.data.chat import tokenize_chat  # noqa: E402
from llm.data.tokenizer import open_tokenizer  # noqa: E402

# "<<" and ">>" mark the generation block; the plain template drops them
TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for message in messages %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
               "{% if message['role'] == 'assistant' %}<<{{ message['content'] | trim + "
               "'<|eot_id|>' }}>>{% else %}{{ message['content'] | trim + '<|eot_id|>' }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
    "qwen2.5": ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are "
                "a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
                "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
                "{%- if message['role'] == 'assistant' %}<<{{- message['content'] + "
                "'<|im_end|>' }}>>{{- '\\n' }}{%- else %}{{- message['content'] + "
                "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
                "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                dict(eos_token="<|im_end|>")),
    "mistral-v0.3": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% set last_user = turns|length - 2 if turns[-1]['role'] == 'assistant' "
        "else turns|length - 1 %}"
        "{% for message in turns %}{% if message['role'] == 'user' %}"
        "{% if system and loop.index0 == last_user %}"
        "{{ '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
        "{% else %}{{ ' ' }}<<{{ message['content'] | trim + eos_token }}>>{% endif %}"
        "{% endfor %}", dict(bos_token="<s>", eos_token="</s>")),
    "phi-3": ("{% for message in messages %}{% if message['role'] == 'system' %}"
              "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
              "{% elif message['role'] == 'user' %}"
              "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
              "{% else %}{{ '<|assistant|>\\n' }}<<{{ message['content'] + '<|end|>' }}>>"
              "{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
              dict(bos_token="<s>", eos_token="<|endoftext|>")),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
              "{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'model' %}"
              "<<{{ message['content'] | trim + '<end_of_turn>' }}>>{{ '\\n' }}"
              "{% else %}{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
              "{% endif %}", dict(bos_token="<bos>", eos_token="<eos>")),
}
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]", "<|system|>",
            "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>"]
# the assistant repeats text of the user turns before it: that text must not be taken
# for the assistant's
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Say yes."},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "Now: yes and no, twice."},
                {"role": "assistant", "content": " yes and no, twice. "}]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  texts = [p.read_text() for p in sorted(Path(os.__file__).parent.glob("[d-f]*.py"))[:10]]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path_factory.mktemp("chat_tok") / "tokenizer.json"
  tok.save(str(path))
  return path


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_mask_equals_transformers_generation_mask(name, tokenizer_json, tmp_path):
  template, tokens = TEMPLATES[name]
  tagged = template.replace("<<", "{% generation %}").replace(">>", "{% endgeneration %}")
  plain = template.replace("<<", "").replace(">>", "")
  (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {**tokens, "tokenizer_class": "PreTrainedTokenizerFast"}))
  messages = CONVERSATION[1:] if name == "gemma" else CONVERSATION
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  expected = hf.apply_chat_template(messages, chat_template=tagged, tokenize=True,
                                    return_dict=True, return_assistant_tokens_mask=True)
  ids, mask = tokenize_chat(open_tokenizer(tmp_path / "tokenizer.json"), plain, messages)
  assert list(ids) == list(expected["input_ids"])
  np.testing.assert_array_equal(mask, np.asarray(expected["assistant_masks"], bool))
  assert mask.sum() > 0


@pytest.mark.parametrize("name", ["qwen2.5", "phi-3", "llama3"])
def test_preference_completion_is_what_trl_counts(name, tokenizer_json, tmp_path):
  """A conversational pair's completion is every token after the prefix the tokenized
  prompt (with the generation prompt) shares with both sides, as TRL 1.16's DPOTrainer
  tokenizes it: with ChatML the "\\n" after <|im_end|> is in, with Phi-3 the final EOS."""
  from llm.data.preference import _tokenize_pair
  template, tokens = TEMPLATES[name]
  plain = template.replace("<<", "").replace(">>", "")
  (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {**tokens, "tokenizer_class": "PreTrainedTokenizerFast"}))
  prompt = CONVERSATION[:4]
  chosen = prompt + [{"role": "assistant", "content": "yes and no, twice."}]
  rejected = prompt + [{"role": "assistant", "content": "no"}]
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)

  def tok(messages, **kw):
    return list(hf.apply_chat_template(messages, chat_template=plain, tokenize=True,
                                       return_dict=True, **kw)["input_ids"])

  # TRL 1.16, DPOTrainer._prepare_dataset's tokenize_fn for conversational examples
  prompt_ids = tok(prompt, add_generation_prompt=True)
  pc, pr = tok(chosen), tok(rejected)
  common = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),  # noqa: E731
                             min(len(a), len(b)))
  start = min(common(prompt_ids, pc), common(prompt_ids, pr))
  c_ids, c_mask, r_ids, r_mask = _tokenize_pair(open_tokenizer(tmp_path / "tokenizer.json"),
                                                plain, chosen, rejected)
  assert list(c_ids) == pc and list(r_ids) == pr
  assert list(c_ids[c_mask]) == pc[start:] and list(r_ids[r_mask]) == pr[start:]
  end = {"qwen2.5": "<|im_end|>\n", "phi-3": "<|end|>\n<|endoftext|>",
         "llama3": "<|eot_id|>"}[name]
  assert hf.decode(pc[start:]).endswith(end)
