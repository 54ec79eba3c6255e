"""sft: supervised fine-tuning on chat examples (llm.data.sft), the masked next-token
cross-entropy over the assistant's tokens (data.chat.loss_on). Its held-out metrics, in
training and in llm.evaluate, are those of pretraining over the validation examples'
masked tokens."""

from __future__ import annotations

from llm.data.sft import CHAT_EXAMPLES
from llm.objectives.base import Objective
from llm.objectives.pretrain import next_token, perplexity

OBJECTIVE = Objective(loss=next_token, data=CHAT_EXAMPLES, heldout=perplexity)
