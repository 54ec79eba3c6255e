"""DPO of the SFT'd tiny model (configs/sft_tiny.py) on preference pairs of the same task.

    python -m llm.eval.tasks make --task=reverse --out=data/reverse
    python -m llm.train --config=configs/sft_tiny.py --workdir=runs/sft_reverse \
        --config.train.init_params=runs/tiny --config.data.tokenizer_path=runs/tiny/tokenizer.model \
        --config.data.paths=data/reverse/train.jsonl
    python -m llm.eval.tasks pairs --task=reverse --out=data/reverse_pairs
    python -m llm.train --config=configs/dpo_tiny.py --workdir=runs/dpo_reverse \
        --config.train.init_params=runs/sft_reverse --config.data.tokenizer_path=runs/tiny/tokenizer.model
    python -m llm.eval.tasks score --workdir=runs/dpo_reverse --data=data/reverse/test.jsonl

The pairs: the right answer chosen, a near miss (two letters swapped) rejected. The
reference is the starting SFT model (its log-probabilities are computed once).
"""

import configs.sft_tiny as sft_tiny


def get_config():
  c = sft_tiny.get_config()
  c.train.update(objective="dpo", steps=300, batch_size=16, log_every=25, eval_every=100,
                 eval_batches=8, checkpoint_every=300)
  c.train.dpo.update(beta=0.1, loss_type="sigmoid")
  c.data.update(paths="data/reverse_pairs/train.jsonl", val_fraction=0.05)
  c.optim.update(lr=3e-4, warmup_steps=20, weight_decay=0.0)
  return c
