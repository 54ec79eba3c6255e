"""Generated chat tasks with verifiable answers, and exact-match scoring of a model on them.

    python -m llm.eval.tasks make --task=reverse --out=data/reverse   # train.jsonl, test.jsonl
    python -m llm.eval.tasks pairs --task=reverse --out=data/reverse_pairs \
        [--workdir=runs/sft]   # for dpo; rejecting the model's own wrong replies
    python -m llm.eval.tasks score --workdir=runs/sft --data=data/reverse/test.jsonl

Each task (TASKS) draws examples from a seeded generator as {"messages": [user,
assistant]} JSONL (the answer is the assistant's content). `exact_match` asks the model
each test question through the run's chat template (greedy) and counts replies equal
to the answer after stripping surrounding whitespace. The same answers serve as
rewards for preference data and RL (llm.training alignment objectives).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Callable

WORDS = ("the king queen love night day sword crown heart blood death life sleep dream "
         "honour lord lady father mother son brother sister friend enemy war peace fire "
         "water earth air star moon sun rose thorn grave ghost").split()


def _reverse(rng: random.Random) -> tuple[str, str]:
  word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
  return f"Reverse the letters: {word}", word[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  return f"What is {a} + {b}?", str(a + b)


def _last_word(rng: random.Random) -> tuple[str, str]:
  words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
  return f"Which word comes last: {' '.join(words)}", words[-1]


# --task -> a generator of (question, answer) from a seeded random.Random
TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "add": _add, "last_word": _last_word}


def examples(task: str, n: int, seed: int) -> list[dict]:
  if task not in TASKS:
    raise ValueError(f"task {task!r} is not known; choose one of {sorted(TASKS)}")
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    question, answer = TASKS[task](rng)
    out.append({"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]})
  return out


def wrong_answer(answer: str, rng: random.Random, question: str = "") -> str:
  """A plausible wrong answer: a number changed, another word of the question (or of
  WORDS) for a word answer, else two characters swapped."""
  if answer in WORDS:
    others = [w for w in question.split(":")[-1].split() if w in WORDS and w != answer]
    return rng.choice(others or [w for w in WORDS if w != answer])
  if answer.isdigit():
    return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
  if len(set(answer)) == 1:
    return answer + answer[0]
  while True:
    i, j = sorted(rng.sample(range(len(answer)), 2))
    wrong = answer[:i] + answer[j] + answer[i + 1:j] + answer[i] + answer[j + 1:]
    if wrong != answer:
      return wrong


def to_pairs(examples_: list[dict], seed: int, replies: list[str] | None = None) -> list[dict]:
  """TRL-style preference pairs: the question, the right answer chosen, a wrong one
  rejected: the model's own reply where `replies` has a wrong one, else a near miss."""
  rng = random.Random(seed)
  out = []
  for i, e in enumerate(examples_):
    answer = e["messages"][-1]["content"]
    reply = replies[i].strip() if replies is not None else ""
    rejected = (reply if reply and reply != answer.strip() else
                wrong_answer(answer, rng, e["messages"][-2]["content"]))
    out.append({"prompt": e["messages"][:-1], "chosen": [e["messages"][-1]],
                "rejected": [{"role": "assistant", "content": rejected}]})
  return out


def write_task(task: str, out_dir: str | Path, n_train: int = 4000, n_test: int = 200,
               seed: int = 0, pairs: bool = False, policy=None) -> tuple[Path, Path]:
  """train.jsonl and test.jsonl (disjoint questions) under out_dir; with `pairs`,
  preference pairs (to_pairs) instead of chat examples, rejecting the greedy replies of
  `policy` = (config, params, tokenizer) where they are wrong."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  test = examples(task, n_test, seed + 1)
  held_out = {e["messages"][0]["content"] for e in test}
  train = [e for e in examples(task, n_train + n_test, seed)
           if e["messages"][0]["content"] not in held_out][:n_train]
  if pairs:
    replies = [None, None]
    if policy is not None:
      replies = [exact_match(*policy, part)[1] for part in (train, test)]
    train, test = to_pairs(train, seed, replies[0]), to_pairs(test, seed + 1, replies[1])
  paths = out / "train.jsonl", out / "test.jsonl"
  for path, rows in zip(paths, (train, test)):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
  return paths


def read_examples(path: str | Path) -> list[dict]:
  """{"messages": [...]} per JSONL line of a scoring set: chat examples in any format
  llm.data.chat reads, each ending with the assistant's answer (checked here, naming the
  line, before any model is loaded)."""
  from llm.data.chat import to_messages
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--data={str(path)!r} does not exist")
  out = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not valid JSON: {e}") from None
    messages = to_messages(record, where)
    answer = messages[-1]
    if len(messages) < 2 or answer["role"] != "assistant" or not answer["content"].strip():
      raise ValueError(f"{where}: a scored example is a chat whose last message is the "
                       "assistant's answer (non-empty), after the question")
    out.append({"messages": messages})
  if not out:
    raise ValueError(f"--data={str(path)!r} holds no examples")
  return out


def exact_match(config, params, tokenizer, test: list[dict], max_tokens: int = 16,
                batch_size: int = 64) -> tuple[float, list[str]]:
  """(fraction of greedy replies equal to the reference answer, the replies)."""
  from llm.inference import SamplingParams, chat
  replies: list[str] = []
  for i in range(0, len(test), batch_size):
    part = test[i:i + batch_size]
    prompts = [e["messages"][:-1] for e in part]
    replies += chat(config, params, tokenizer, prompts, max_tokens,
                    SamplingParams(temperature=0.0))
  answers = [e["messages"][-1]["content"].strip() for e in test]
  hits = sum(r.strip() == a for r, a in zip(replies, answers))
  return hits / max(len(test), 1), replies


def main(argv: list[str]) -> None:
  f = FLAGS
  if len(argv) != 2 or argv[1] not in ("make", "pairs", "score"):
    raise ValueError(f"usage: python -m llm.eval.tasks make|pairs|score [flags]; got {argv[1:]}")
  if argv[1] in ("make", "pairs"):
    if not f.task or not f.out:
      raise ValueError(f"{argv[1]} needs --task and --out")
    policy = None
    if argv[1] == "pairs" and f.workdir:
      from llm.inference import load
      policy = load(f.workdir)
      if f.template:
        policy[0].data.chat.template = f.template
    train, test = write_task(f.task, f.out, f.n_train, f.n_test, f.seed, argv[1] == "pairs",
                             policy)
    print(f"wrote {train} and {test}")
    return
  if not f.workdir or not f.data:
    raise ValueError("score needs --workdir and --data")
  test = read_examples(f.data)[:f.limit or None]  # checked before the model loads
  from llm.inference import load
  config, params, tok = load(f.workdir)
  if f.template:
    config.data.chat.template = f.template
  accuracy, replies = exact_match(config, params, tok, test)
  for e, r in list(zip(test, replies))[:5]:
    print(f"  {e['messages'][-2]['content']!r} -> {r.strip()!r} "
          f"(answer {e['messages'][-1]['content']!r})")
  print(json.dumps({"exact_match": accuracy, "n": len(test), "workdir": f.workdir}))


if __name__ == "__main__":
  from absl import flags

  from llm.cli import run
  flags.DEFINE_string("task", "", f"make: one of {sorted(TASKS)}")
  flags.DEFINE_string("out", "", "make: the directory for train.jsonl and test.jsonl")
  flags.DEFINE_integer("n_train", 4000, "make: training examples")
  flags.DEFINE_integer("n_test", 200, "make: test examples (questions not in train)")
  flags.DEFINE_integer("seed", 0, "make: generator seed")
  flags.DEFINE_string("workdir", "", "score: the run to score; pairs: reject its own wrong "
                      "greedy replies")
  flags.DEFINE_string("data", "", "score: a test.jsonl")
  flags.DEFINE_integer("limit", 0, "score: the first N examples only (0: all)")
  flags.DEFINE_string("template", "", "score: a built-in chat template (default: the run's)")
  FLAGS = flags.FLAGS
  run(main)
