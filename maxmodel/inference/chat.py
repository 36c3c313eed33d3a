"""Chat messages -> prompt ids with the model's own template.

The Jinja chat template of a Hugging Face `tokenizer_config.json` beside the model (which `maxmodel convert
from-hf` carries over), or the one `data.chat_template` names, renders as transformers' `apply_chat_template`
does (maxmodel/data/chat_template.py), and its text already holds BOS where the template puts it, so it is
tokenized without adding special tokens (as `apply_chat_template(tokenize=True)` does). Without one, the
simple template training used (`data.chat_template`) renders each turn, the generation prompt is the
assistant turn's opening, and the prompt starts with BOS like every training document."""
from __future__ import annotations

from maxmodel.data.chat_template import is_jinja_spec, load_chat_template

VALID_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list of {role, content} objects is required")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in VALID_ROLES:
            raise ValueError(f"messages[{i}]: needs a role ({', '.join(VALID_ROLES)}) and a string content")


def jinja_template(generator):
    """The model's Jinja chat template, or None (then the simple template applies)."""
    spec = generator.engine.cfg.data.chat_template
    if is_jinja_spec(spec):
        return load_chat_template(spec, generator.engine.cfg.data.tokenizer)
    config = generator.model_dir / "tokenizer_config.json" if generator.model_dir else None
    if config is not None and config.is_file() and '"chat_template"' in config.read_text():
        return load_chat_template(str(config), str(config))
    return None


def render_chat(generator, messages: list[dict], add_generation_prompt: bool = True) -> str:
    check_messages(messages)
    template = generator.chat_template
    if template is not None:
        return template.render(messages, add_generation_prompt=add_generation_prompt)
    simple = generator.engine.cfg.data.chat_template
    text = "".join(simple.format(role=m["role"], content=m["content"]) for m in messages)
    if add_generation_prompt:
        text += simple.split("{content}")[0].format(role="assistant")
    return text


def encode_chat(generator, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    text = render_chat(generator, messages, add_generation_prompt)
    if generator.chat_template is not None:
        return generator.tokenizer.encode(text)  # the template wrote the special tokens it wants
    return generator.encode_prompt(text)
