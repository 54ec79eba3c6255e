"""GRPO of a partly trained SFT model (configs/sft_tiny.py, 60 steps) on prompts of the same task.

    python -m llm.eval.tasks make --task=last_word --out=data/last_word
    python -m llm.train --config=configs/sft_tiny.py --workdir=runs/sft_partial \
        --config.train.init_params=runs/tiny --config.data.tokenizer_path=runs/tiny/tokenizer.model \
        --config.train.steps=60 --config.data.seq_len=64
    python -m llm.train --config=configs/grpo_tiny.py --workdir=runs/grpo \
        --config.train.init_params=runs/sft_partial \
        --config.data.tokenizer_path=runs/tiny/tokenizer.model
    python -m llm.eval.tasks score --workdir=runs/grpo --data=data/last_word/test.jsonl

The prompts are the task's chat examples: the user's question is the prompt and the
assistant's answer the `answer` that the exact-match reward compares with. Each step
samples 8 completions for each of 4 prompts, normalises their rewards within each
prompt's group, and takes one clipped policy step with a KL penalty (beta 0.04) to the
starting model. The held-out reward (greedy replies to 200 validation prompts) is logged
at step 0 and every 100 steps. A reward model (train.objective=reward) can replace or
join the exact match: --config.train.grpo.reward_model=runs/rm.
"""

import configs.sft_tiny as sft_tiny


def get_config():
  c = sft_tiny.get_config()
  c.train.update(objective="grpo", steps=300, batch_size=32, log_every=10, eval_every=100,
                 checkpoint_every=100)
  c.train.grpo.update(num_generations=8, max_new_tokens=12, temperature=1.0,
                      rewards="exact_match", beta=0.04, loss_type="dapo", num_iterations=1,
                      eval_prompts=200)
  c.data.update(paths="data/last_word/train.jsonl", val_fraction=0.05, seq_len=64)
  c.optim.update(lr=1e-4, schedule="constant", warmup_steps=10, weight_decay=0.0)
  return c
