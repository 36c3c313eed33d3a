"""Documents to token ids plus per-token loss weights, for every `data.format`.

`weights[i]` says whether token i counts as a prediction target. Plain text trains on every token after BOS.
The supervised formats train only on what the model should learn to write:
- `prompt_completion` ({"prompt", "completion"}): BOS + prompt (weight 0) + completion + EOS (weight 1);
- `chat` ({"messages": [{"role", "content"}, ...]}): each message rendered with `data.chat_template`,
  whose text before `{content}` (the role header) never counts; an assistant message's content and the
  template text after it (the end-of-turn marker) count, every other message does not; the final EOS
  counts when the conversation ends with an assistant turn. A Jinja `data.chat_template` (the model's own,
  from a tokenizer_config.json) is rendered as transformers renders it instead: see chat_template.py.
"""
from __future__ import annotations

import numpy as np

from maxmodel.config.errors import ConfigError

from .chat_template import encode_chat, is_jinja_spec, template_for

FORMATS = ("text", "prompt_completion", "chat")
DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}<|end|>\n"


def split_template(template: str) -> tuple[str, str]:
    """(header, footer) around `{content}`; `{role}` is filled per message."""
    if template.count("{content}") != 1:
        raise ConfigError("data.chat_template", f"must contain '{{content}}' exactly once, got {template!r}")
    header, footer = template.split("{content}")
    return header, footer


def encode_document(doc, fmt: str, tokenizer, chat_template: str = DEFAULT_CHAT_TEMPLATE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, weights uint8) for one document, BOS first and EOS last (with a Jinja chat template,
    wherever the template puts them)."""
    if fmt == "chat" and is_jinja_spec(chat_template):
        return encode_chat(doc["messages"], template_for(chat_template, str(getattr(tokenizer, "path", ""))),
                           tokenizer)
    pieces: list[tuple[list[int], int]] = [([tokenizer.bos_id], 0)]
    end_counts = 1
    if fmt == "text":
        pieces.append((tokenizer.encode(doc), 1))
    elif fmt == "prompt_completion":
        pieces += [(tokenizer.encode(doc["prompt"]), 0), (tokenizer.encode(doc["completion"]), 1)]
    elif fmt == "chat":
        header, footer = split_template(chat_template)
        for m in doc["messages"]:
            learn = int(m["role"] == "assistant")
            pieces += [(tokenizer.encode(header.replace("{role}", m["role"])), 0),
                       (tokenizer.encode(m["content"] + footer.replace("{role}", m["role"])), learn)]
        end_counts = learn  # EOS is learned after an assistant turn, not after a trailing user turn
    else:
        raise ConfigError("data.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    pieces.append(([tokenizer.eos_id], end_counts))
    tokens = np.fromiter((t for ids, _ in pieces for t in ids), np.int32)
    weights = np.fromiter((w for ids, w in pieces for _ in ids), np.uint8, count=len(tokens))
    return tokens, weights


def document_text(doc, fmt: str, chat_template: str = DEFAULT_CHAT_TEMPLATE, tokenizer_path: str = "") -> str:
    """The text a document renders to (what a tokenizer trained on this data should see)."""
    if fmt == "text":
        return doc
    if fmt == "preference":  # the prompt and every response (a normalised record, preference_records.py)
        from .preference_records import messages
        if not doc["chat"]:
            return "".join([doc["prompt"], *doc["responses"]])
        return "".join(document_text({"messages": messages(doc["prompt"]) + messages(r, "assistant")}, "chat",
                                     chat_template, tokenizer_path) for r in doc["responses"])
    if fmt == "prompt_completion":
        return doc["prompt"] + doc["completion"]
    if is_jinja_spec(chat_template):
        return template_for(chat_template, tokenizer_path).render(doc["messages"])
    header, footer = split_template(chat_template)
    return "".join(header.replace("{role}", m["role"]) + m["content"] + footer.replace("{role}", m["role"])
                   for m in doc["messages"])
