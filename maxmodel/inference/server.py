"""OpenAI-compatible HTTP server over the generation engine: FastAPI on uvicorn.

`create_app(engine)` builds the ASGI app; `serve(engine, ...)` runs it (the `maxmodel serve` command);
`ServerThread(app)` runs it in a background thread on a free 127.0.0.1 port (tests, benchmarks).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming with `stream`),
GET /health, GET /metrics (Prometheus), and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info,
through which lm-eval's `local-completions` backend tokenizes with the model's own tokenizer.

Every request is submitted to the engine's continuous batch as it arrives (no lock around generation); the
engine thread hands each token to the request's asyncio queue. A streaming client that goes away cancels
its engine requests (their slots are freed at the next decode step); an error inside the engine fails
only the requests it hit (500 with the engine's message). Bad input is a 4xx in OpenAI's error shape
naming the field (server_schema.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
from typing import Self

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import server_openai as fmt
from .server_metrics import Clock, CountRequests, Metrics, RequireKey
from .server_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    from_value_error,
    sampling_options,
    validation_error,
)

log = logging.getLogger("maxmodel.server")

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/tokenize",
         "/detokenize", "/tokenizer_info"}


def vocab_size(engine) -> int:
    size = getattr(engine, "vocab_size", None)
    return int(size if size is not None else engine.engine.vocab_size)


class Submission:
    """The engine requests of one API request (one per prompt), their events bridged from the engine
    thread into the event loop as (prompt index, event, time)."""

    def __init__(self, engine, prompts: list[list[int]], options):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles, self.finished = [], set()
        try:
            for i, ids in enumerate(prompts):
                opts = dataclasses.replace(options) if i else options
                self.handles.append(engine.submit(ids, opts, on_event=self._callback(i)))
        except ValueError as e:
            self.cancel()
            raise from_value_error(e, {"max_new_tokens": "max_tokens"}) from None
        except Exception:
            self.cancel()
            raise

    def _callback(self, i: int):
        def on_event(ev):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev, time.perf_counter()))
        return on_event

    async def events(self):
        while len(self.finished) < len(self.handles):
            i, ev, at = await self.queue.get()
            if ev.kind in ("done", "error"):
                self.finished.add(i)
            yield i, ev, at

    def cancel(self) -> None:
        """Free the slots of every engine request still running (the client is gone, or one failed)."""
        for i, h in enumerate(self.handles):
            if i not in self.finished:
                h.cancel()

    async def results(self) -> list:
        return [await asyncio.to_thread(h.result, 60) for h in self.handles]


def engine_error(ev) -> APIError:
    return APIError(500, f"generation failed: {ev.error}", None, "engine_error")


def create_app(engine, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The ASGI app over a started `engine` (the caller owns its start/stop)."""
    name = model_name or engine.model_name
    tokens = fmt.Tokens(engine.tokenizer)
    metrics = Metrics(engine)
    vocab = vocab_size(engine)
    created = int(time.time())
    app = FastAPI(title="maxmodel", summary="OpenAI-compatible API over a maxmodel generation engine")
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(CountRequests, metrics=metrics, known_paths=PATHS)  # outermost: 401s are counted too
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        err = APIError(e.status_code, str(e.detail), None, {404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", None,
                                     "internal_error").body(), status_code=500)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise APIError(404, f"model: '{requested}' is not served here; this server serves '{name}'",
                           "model", "model_not_found")

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise bad_request(param, f"{param}: is empty")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(param, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})")
        return ids

    def check_length(ids: list[int], max_tokens: int, param: str, max_tokens_field: str) -> None:
        limit = engine.max_len
        if len(ids) >= limit:
            raise bad_request(param, f"{param}: {len(ids)} tokens; this model's context is {limit} tokens "
                                     f"(prompt + completion)", "context_length_exceeded")
        if len(ids) + max_tokens > limit:
            raise bad_request(max_tokens_field, f"{max_tokens_field}: {max_tokens} tokens after a prompt of "
                                                f"{len(ids)} exceed this model's context of {limit} tokens; "
                                                f"ask for at most {limit - len(ids)}", "context_length_exceeded")

    def streaming(sub: Submission, body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(sub.cancel))

    async def collect(sub: Submission, clock: Clock, request: Request) -> list:
        """Wait for every engine request of a non-streaming call; its results. A client that hangs up
        meanwhile cancels them (nothing would read the answer)."""
        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            sub.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for i, ev, at in sub.events():
                if ev.kind == "token":
                    clock.token((i, ev.index), at)
                elif ev.kind == "error":
                    raise engine_error(ev)
        finally:
            watcher.cancel()
            sub.cancel()
        return await sub.results()

    # ---------------------------------------------------------------- routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "maxmodel", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        req.check_unsupported()
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt", "prompt: is empty")
        texts, ids = [], []
        for k, p in enumerate(prompt):
            param = "prompt" if len(prompt) == 1 else f"prompt[{k}]"
            if isinstance(p, str):
                texts.append(p)
                ids.append(engine.encode_prompt(p))
            else:
                ids.append(check_ids(list(p), param))
                texts.append(engine.tokenizer.decode(ids[-1]) if req.echo else "")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        options = sampling_options(req, max_tokens=max_tokens, logprobs=req.logprobs, echo=bool(req.echo),
                                   best_of=req.best_of)
        for k, p in enumerate(ids):
            check_length(p, max_tokens, "prompt" if len(ids) == 1 else f"prompt[{k}]", "max_tokens")
        n, want_lp = options.n, req.logprobs is not None
        clock = Clock(metrics, "/v1/completions")
        sub = Submission(engine, ids, options)
        rid = fmt.new_id("cmpl")

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body():
                offsets, generated = {}, 0
                try:
                    async for i, ev, at in sub.events():
                        if ev.kind == "error":
                            yield fmt.sse(engine_error(ev).body())
                            break
                        if ev.kind != "token":
                            continue
                        clock.token((i, ev.index), at)
                        generated += 1
                        index = i * n + ev.index
                        if ev.text or want_lp or ev.finish_reason:
                            choice = fmt.completion_chunk_choice(tokens, index, ev, want_lp, offsets.get(index, 0))
                            offsets[index] = offsets.get(index, 0) + sum(map(len, (choice["logprobs"] or {})
                                                                             .get("tokens", [])))
                            yield fmt.sse(fmt.envelope(rid, "text_completion", name, [choice]))
                    else:
                        clock.finish(sum(map(len, ids)), generated)
                        if include_usage:
                            yield fmt.sse(fmt.envelope(rid, "text_completion", name, [],
                                                       usage=fmt.usage(sum(map(len, ids)), generated)))
                    yield fmt.SSE_DONE
                finally:
                    sub.cancel()
            return streaming(sub, body())

        results = await collect(sub, clock, request)
        choices = [fmt.completion_choice(tokens, i * n + comp.index, comp, res, texts[i], bool(req.echo), want_lp)
                   for i, res in enumerate(results) for comp in res.completions]
        choices.sort(key=lambda c: c["index"])
        completion_tokens = sum(len(c.token_ids) for r in results for c in r.completions)
        clock.finish(sum(map(len, ids)), completion_tokens)
        return fmt.envelope(rid, "text_completion", name, choices,
                            usage=fmt.usage(sum(map(len, ids)), completion_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        req.check_unsupported()
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            m.setdefault("content", "")
            if m["role"] == "developer":  # OpenAI's newer name for the system turn
                m["role"] = "system"
        try:
            ids = engine.encode_chat(messages, add_generation_prompt=req.add_generation_prompt is not False)
        except ValueError as e:
            raise from_value_error(e) from None
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            if len(ids) >= engine.max_len:
                check_length(ids, 1, "messages", field)
            max_tokens = engine.max_len - len(ids)
        want_lp = bool(req.logprobs)
        options = sampling_options(req, max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if want_lp else None,
                                   max_tokens_field=field, logprobs_field="top_logprobs")
        check_length(ids, max_tokens, "messages", field)
        clock = Clock(metrics, "/v1/chat/completions")
        sub = Submission(engine, [ids], options)
        rid = fmt.new_id("chatcmpl")

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body():
                started, generated = set(), 0
                try:
                    async for _, ev, at in sub.events():
                        if ev.kind == "error":
                            yield fmt.sse(engine_error(ev).body())
                            break
                        if ev.kind != "token":
                            continue
                        clock.token(ev.index, at)
                        generated += 1
                        if ev.index not in started:
                            started.add(ev.index)
                            yield fmt.sse(fmt.envelope(rid, "chat.completion.chunk", name,
                                                       [fmt.chat_role_choice(ev.index)]))
                        if ev.text or want_lp or ev.finish_reason:
                            yield fmt.sse(fmt.envelope(rid, "chat.completion.chunk", name,
                                                       [fmt.chat_chunk_choice(tokens, ev.index, ev, want_lp)]))
                    else:
                        clock.finish(len(ids), generated)
                        if include_usage:
                            yield fmt.sse(fmt.envelope(rid, "chat.completion.chunk", name, [],
                                                       usage=fmt.usage(len(ids), generated)))
                    yield fmt.SSE_DONE
                finally:
                    sub.cancel()
            return streaming(sub, body())

        (result,) = await collect(sub, clock, request)
        choices = [fmt.chat_choice(tokens, c.index, c, want_lp) for c in result.completions]
        completion_tokens = sum(len(c.token_ids) for c in result.completions)
        clock.finish(len(ids), completion_tokens)
        return fmt.envelope(rid, "chat.completion", name, choices, usage=fmt.usage(len(ids), completion_tokens))

    # ---- vLLM's tokenizer endpoints (lm-eval's remote tokenizer backend)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        ids = engine.encode_prompt(req.prompt) if req.add_special_tokens else engine.tokenizer.encode(req.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        return {"prompt": engine.tokenizer.decode(check_ids(req.tokens, "tokens"))}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = engine.tokenizer
        special = {k: tokens.text(getattr(tok, f"{k}_id")) if getattr(tok, f"{k}_id", None) is not None else None
                   for k in ("bos", "eos", "pad")}
        return {"tokenizer_class": type(tok).__name__, "model_max_length": engine.max_len,
                "eos_token": special["eos"], "bos_token": special["bos"], "pad_token": special["pad"],
                "eos_token_id": tok.eos_id, "bos_token_id": getattr(tok, "bos_id", None)}

    return app


# ---------------------------------------------------------------- running it

def _config(app, host: str, port: int, log_level: str):
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def serve(engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Start the engine, serve until interrupted (Ctrl-C / SIGTERM: uvicorn's graceful shutdown), stop."""
    import uvicorn
    engine.start()
    try:
        uvicorn.Server(_config(create_app(engine, model_name, api_key), host, port, log_level)).run()
    finally:
        engine.stop()


class ServerThread:
    """`with ServerThread(app) as s: ... s.url ...`: uvicorn in a background thread on `host`, on a free
    port when `port` is 0 (the socket is bound before the server starts, so there is no race for it)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(_config(app, host, self.port, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="maxmodel-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
