"""Request bodies of the OpenAI-compatible server (pydantic models FastAPI validates), their conversion to
`SamplingOptions`, and the OpenAI error shape every 4xx/5xx answer uses.

The models are strict (no "5" for 5, no 1 for true) and refuse unknown fields, as the OpenAI API does: a
misspelt option is an error naming it, not a silently ignored default. vLLM's extensions that the engine
implements (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos) are accepted too.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .sampling import SamplingOptions


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "internal_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share. None = the endpoint's default (clients may send explicit nulls)."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None               # vLLM extension; -1 or 0 = off
    min_p: float | None = None             # vLLM extension
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    ignore_eos: bool | None = None          # vLLM extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias", "logit_bias: not supported by this server", "unsupported_parameter")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise bad_request("suffix", "suffix: not supported by this server", "unsupported_parameter")
        if self.stream and self.echo:
            raise bad_request("echo", "echo: not supported together with stream", "unsupported_parameter")
        if self.stream and self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request("best_of", "best_of: must equal n when streaming (the best are known only at "
                                         "the end)", "unsupported_parameter")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None  # vLLM extension (default true)

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if not self.messages:
            raise bad_request("messages", "messages: at least one message is required")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "top_logprobs: needs logprobs=true")


class TokenizeRequest(_Strict):
    """vLLM's /tokenize (lm-eval's remote tokenizer uses it)."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


_FIELD = re.compile(r"[A-Za-z_]\w*(\[\d+\]|\.\w+)*")
# Sampling field -> the request field a user wrote (for error messages).
_FIELD_NAMES = {"max_new_tokens": "max_tokens"}


def sampling_options(req: _Sampling, *, max_tokens: int, logprobs: int | None, echo: bool = False,
                     best_of: int | None = None, max_tokens_field: str = "max_tokens",
                     logprobs_field: str = "logprobs") -> SamplingOptions:
    """The engine's options for a request (logprobs: 0..MAX_LOGPROBS top alternatives); APIError(400)
    naming the request's field for a bad value."""
    def default(v, d):
        return d if v is None else v

    top_k = default(req.top_k, 0)
    opts = SamplingOptions(
        max_new_tokens=max_tokens, temperature=default(req.temperature, 1.0), top_k=0 if top_k == -1 else top_k,
        top_p=default(req.top_p, 1.0), min_p=default(req.min_p, 0.0),
        repetition_penalty=default(req.repetition_penalty, 1.0),
        presence_penalty=default(req.presence_penalty, 0.0), frequency_penalty=default(req.frequency_penalty, 0.0),
        seed=req.seed, stop=default(req.stop, []), stop_token_ids=list(default(req.stop_token_ids, [])),
        ignore_eos=default(req.ignore_eos, False), logprobs=logprobs, echo=echo, n=default(req.n, 1),
        best_of=best_of)
    try:
        return opts.validate()
    except ValueError as e:
        raise from_value_error(e, {"max_new_tokens": max_tokens_field, "logprobs": logprobs_field}) from None


def from_value_error(e: ValueError, names: dict | None = None, status: int = 400) -> APIError:
    """The engine's ValueError("field: why") as a 4xx naming the request's field."""
    text = str(e)
    field, sep, why = text.partition(": ")
    if not sep or not _FIELD.fullmatch(field):
        return APIError(status, text, None, "invalid_value")
    name = (names or {}).get(field, _FIELD_NAMES.get(field, field))
    return APIError(status, f"{name}: {why}", name, "invalid_value")


# ---------------------------------------------------------------- validation errors -> OpenAI errors

_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after",
                "function-before", "json-or-python"}
_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string",
}


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.lower() not in _TYPE_LABELS:
            out += ("." if out else "") + part
    return out or None


def _body_loc(err: dict) -> tuple:
    loc = tuple(err.get("loc", ()))
    return loc[1:] if loc[:1] == ("body",) else loc


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI's RequestValidationError.errors() as one 400 naming the first offending field."""
    err = errors[0]
    loc = _body_loc(err)
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx", {}).get("error", "")
        return APIError(400, f"malformed JSON body: {ctx}".rstrip(": "), None, "invalid_json")
    param = _param(loc)
    params = [_param(_body_loc(e)) for e in errors]
    if param is None:
        return APIError(400, f"the request body must be a JSON object: {err.get('msg')}", None, "invalid_type")
    if err.get("type") == "missing":
        return APIError(400, f"{param}: is required", param, "missing_required_parameter")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"{param}: unrecognized request argument", param, "unknown_parameter")
    leaf = param.rsplit(".", 1)[-1].split("[")[0]
    why = _UNION_HINTS[leaf] if params.count(param) > 1 and leaf in _UNION_HINTS else err.get("msg", "invalid")
    got = err.get("input")
    return APIError(400, f"{param}: {why} (got {type(got).__name__} {got!r:.60})", param, "invalid_type")
