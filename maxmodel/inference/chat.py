"""Chat messages -> prompt text with the model's own template.

A Hugging Face model directory's `tokenizer_config.json` carries a Jinja chat template; without one, the
simple template training used (`data.chat_template`) renders each turn, and the generation prompt is the
assistant turn's opening."""
from __future__ import annotations

VALID_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list of {role, content} objects is required")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in VALID_ROLES:
            raise ValueError(f"messages[{i}]: needs a role ({', '.join(VALID_ROLES)}) and a string content")


def render_chat(generator, messages: list[dict], add_generation_prompt: bool = True) -> str:
    check_messages(messages)
    template = generator.engine.cfg.data.chat_template
    text = "".join(template.format(role=m["role"], content=m["content"]) for m in messages)
    if add_generation_prompt:
        text += template.split("{content}")[0].format(role="assistant")
    return text
