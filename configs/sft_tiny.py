"""Supervised fine-tuning of the tiny Shakespeare model on a generated chat task.

    python -m llm.train --config=configs/tiny.py --workdir=runs/tiny
    python -m llm.eval.tasks make --task=last_word --out=data/last_word
    python -m llm.train --config=configs/sft_tiny.py --workdir=runs/sft \
        --config.train.init_params=runs/tiny --config.data.tokenizer_path=runs/tiny/tokenizer.model
    python -m llm.eval.tasks score --workdir=runs/sft --data=data/last_word/test.jsonl

Other tasks: --task=reverse|add and --config.data.paths=data/TASK/train.jsonl. LoRA:
--config.model.lora.rank=8 --config.model.lora.targets=q,k,v,o,gate,up,down.

Starts from the pretrained tiny model (train.init_params: a workdir's newest checkpoint
or a params-only checkpoint) and its sentencepiece tokenizer; the Mistral [INST]
template needs only its BOS/EOS as special tokens, which that tokenizer has.
"""

import configs.tiny as tiny


def get_config():
  c = tiny.get_config()
  c.train.update(objective="sft", steps=600, batch_size=16, log_every=50, eval_every=200,
                 eval_batches=4, checkpoint_every=600, z_loss=0.0)
  c.data.update(source="jsonl", paths="data/last_word/train.jsonl", val_fraction=0.02)
  c.data.chat.update(template="mistral", loss_on="assistant")
  c.optim.update(lr=1e-3, warmup_steps=30, weight_decay=0.0)
  return c
