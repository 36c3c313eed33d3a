"""A model's own chat template: the Jinja template of a Hugging Face `tokenizer_config.json`, rendered as
transformers' `apply_chat_template` renders it, with the assistant spans the loss trains on.

Rendering follows transformers (utils/chat_template_utils.py): jinja2's ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks and the loopcontrols extension, a `tojson` filter that does not HTML-escape,
`raise_exception` and `strftime_now` globals, the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
as variables, `messages` and `add_generation_prompt`. transformers itself is not imported here: it brings
torch, which never enters maxmodel's environment (tests/test_chat_template.py checks us against it out of
process).

Assistant spans: a template that marks them with `{% generation %} ... {% endgeneration %}` (transformers'
`return_assistant_tokens_mask` convention) gives them directly. Otherwise they are derived from the rendering:
assistant message i spans from the end of render(messages[:i], add_generation_prompt=True) (its header, which
the model is prompted with) to the end of render(messages[:i+1]) (its content and end-of-turn marker, which
it must learn to write). That needs a template whose renderings of successive prefixes extend each other;
one that does not is refused with a message saying to add generation tags.
"""
from __future__ import annotations

import functools
import json
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from maxmodel.config.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render (its own raise_exception, or a Jinja error)."""


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span its body renders to (as
    transformers' AssistantTracker does). Spans are collected only while `track` is active."""
    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self.spans: ContextVar = ContextVar("maxmodel_generation_spans", default=None)
        environment.extend(generation_tracker=self)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller):
        text = caller()
        state = self.spans.get()
        if state is not None:
            blocks, spans = state
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value):
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass
class ChatTemplate:
    source: str                     # where the template came from (for error messages)
    template: jinja2.Template
    special_tokens: dict
    tracked: bool                   # the template marks assistant text with {% generation %}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template of {self.source} does not render this conversation: "
                                    f"{e}") from None

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(text, character spans the loss trains on)."""
        if self.tracked:
            tracker = self.template.environment.generation_tracker
            blocks, spans = [], []
            token = tracker.spans.set((blocks, spans))
            try:
                for block in self.template.generate(messages=messages, add_generation_prompt=False, tools=None,
                                                    documents=None, **self.special_tokens):
                    blocks.append(block)
            except jinja2.exceptions.TemplateError as e:
                raise ChatTemplateError(f"the chat template of {self.source} does not render this "
                                        f"conversation: {e}") from None
            finally:
                tracker.spans.reset(token)
            return "".join(blocks), spans
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True) if i else ""
            end = self.render(messages[:i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise ChatTemplateError(f"the chat template of {self.source} does not render conversations "
                                        f"incrementally (message {i}), so the assistant spans cannot be derived: "
                                        f"mark them with {{% generation %}} ... {{% endgeneration %}}")
            spans.append((len(start), len(end)))
        return text, spans


def compile_template(text: str, source: str, special_tokens: dict | None = None) -> ChatTemplate:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError("data.chat_template", f"{source}: the Jinja template does not parse (template line "
                                                f"{e.lineno}): {e.message}") from None
    return ChatTemplate(source, template, dict(special_tokens or {}), "{% generation" in text.replace("{%-", "{%"))


def load_chat_template(spec: str, tokenizer_path: str) -> ChatTemplate:
    """`data.chat_template` as a Jinja template: `tokenizer` (the tokenizer_config.json beside
    data.tokenizer, which `maxmodel convert from-hf` carries into the model directory), a
    tokenizer_config.json path, or a .jinja file."""
    if spec == "tokenizer":
        path = Path(tokenizer_path).parent / "tokenizer_config.json"
        if not path.is_file():
            raise ConfigError("data.chat_template", f"'tokenizer' reads the tokenizer_config.json beside "
                                                    f"data.tokenizer={tokenizer_path}, and there is none")
    else:
        path = Path(spec)
    if not path.is_file():
        raise ConfigError("data.chat_template", f"{spec}: no such file")
    if path.suffix == ".jinja":
        return compile_template(path.read_text(), str(path))
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("data.chat_template", f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise ConfigError("data.chat_template", f"{path} has no chat_template")
    specials = {k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
    return compile_template(template, str(path), specials)


@functools.lru_cache(maxsize=8)
def template_for(spec: str, tokenizer_path: str) -> ChatTemplate:
    """The compiled template of a `data.chat_template` value (compiled once per process)."""
    return load_chat_template(spec, tokenizer_path)


def is_jinja_spec(spec) -> bool:
    """A Jinja template reference rather than today's simple `{role}`/`{content}` template."""
    return isinstance(spec, str) and (spec == "tokenizer" or spec.endswith((".json", ".jinja")))


def check_renders(messages: list[dict], template: ChatTemplate) -> None:
    """Raises ChatTemplateError unless the conversation renders with at least one assistant span (the data
    readers call this per record, so the error names its file and line)."""
    if not template.render_with_spans(messages)[1]:
        raise ChatTemplateError(f"the chat template of {template.source} renders no assistant text to train on")


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, weights uint8): the rendering tokenized piece by piece, so every token lies wholly in
    or out of an assistant span (weight 1 inside). BOS/EOS come from the template's own text (its
    `bos_token` / `eos_token`), as they do in transformers."""
    text, spans = template.render_with_spans(messages)
    ids, weights, pos = [], [], 0
    for start, end in sorted(spans):
        for piece, w in ((text[pos:start], 0), (text[start:end], 1)):
            if piece:
                t = tokenizer.encode(piece)
                ids += t
                weights += [w] * len(t)
        pos = end
    if pos < len(text):
        t = tokenizer.encode(text[pos:])
        ids += t
        weights += [0] * len(t)
    return np.asarray(ids, np.int32), np.asarray(weights, np.uint8)
