"""A reward model from the SFT'd tiny model (configs/sft_tiny.py) on preference pairs of its task.

    python -m llm.eval.tasks pairs --task=last_word --out=data/last_word_pairs
    python -m llm.train --config=configs/reward_tiny.py --workdir=runs/rm \
        --config.train.init_params=runs/sft_partial \
        --config.data.tokenizer_path=runs/tiny/tokenizer.model

The backbone comes from the SFT model, the scalar head ("score") starts fresh; the loss is
Bradley-Terry on (chosen, rejected) and evaluation reports the held-out pairwise accuracy
(eval_accuracy). Use it as a GRPO reward with --config.train.grpo.reward_model=runs/rm.
"""

import configs.dpo_tiny as dpo_tiny


def get_config():
  c = dpo_tiny.get_config()
  c.model.head = "score"
  c.train.objective = "reward"
  c.data.update(paths="data/last_word_pairs/train.jsonl", seq_len=64)
  return c
