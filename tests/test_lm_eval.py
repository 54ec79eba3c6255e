"""The lm-evaluation-harness adapter runs local tasks offline, consistent with our scorer."""

import json

import jax
import pytest

lm_eval = pytest.importorskip("lm_eval")

from llm.train import train  # noqa: E402

MC_TASK = """
task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN_TASK = """
task: tiny_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""

ROLLING_TASK = """
task: tiny_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def test_local_tasks_run_offline(config, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  config.train.update(steps=2, checkpoint_every=2)
  train(config, tmp_path / "run", devices=jax.devices()[:1])
  from llm.eval.lm_eval_adapter import WorkdirLM
  lm = WorkdirLM(str(tmp_path / "run"))

  tasks = tmp_path / "tasks"
  tasks.mkdir()
  mc = [{"question": "def f(x):", "choices": [" return x", " pass"], "answer": 0},
        {"question": "import", "choices": [" os", " sys", " re"], "answer": 2}]
  gen = [{"question": "def f(x):", "target": " return x"}]
  text = [{"text": "for i in range(3):\n    print(i)\n"}]
  for name, rows, template in (("mc", mc, MC_TASK), ("gen", gen, GEN_TASK),
                               ("ppl", text, ROLLING_TASK)):
    data = tasks / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / f"{name}.yaml").write_text(template.format(data=data))

  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=str(tasks))
  out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_local_mc", "tiny_local_gen", "tiny_local_ppl"],
                                task_manager=manager, bootstrap_iters=0, log_samples=True)
  results = out["results"]
  assert 0.0 <= results["tiny_local_mc"]["acc,none"] <= 1.0
  assert "exact_match,none" in results["tiny_local_gen"]
  assert results["tiny_local_ppl"]["word_perplexity,none"] > 1.0

  # The harness's multiple-choice picks agree with our scorer's log-likelihoods.
  for sample in out["samples"]["tiny_local_mc"]:
    doc = sample["doc"]
    contexts = [a["arg_0"] if isinstance(a, dict) else a[0] for a in sample["arguments"]]
    conts = [a["arg_1"] if isinstance(a, dict) else a[1] for a in sample["arguments"]]
    ours = [lp for lp, _ in lm.scorer.loglikelihood(list(zip(contexts, conts)))]
    theirs = [float(r[0][0]) for r in sample["resps"]]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert len(conts) == len(doc["choices"])
