"""Supervised fine-tuning: next-token loss on what the model should learn to write only, the completions of
prompt/completion records or the assistant turns of chats (their weights come from data/supervised.py and,
with the model's own Jinja template, data/chat_template.py). Packed rows keep one segment per document, so
no example attends to another."""
from .base import Objective, lm_loss

# The loss is causal_lm's; what differs is the data (format checked here, weights from the records).
OBJECTIVE = Objective("sft", lm_loss, archs=("decoder",), formats=("prompt_completion", "chat"))
