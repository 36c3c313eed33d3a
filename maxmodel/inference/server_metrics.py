"""The server's Prometheus metrics (prometheus-client, one registry per app) and its two ASGI middlewares:
request counting by endpoint and status, and the bearer-token check of `--api-key`.

Engine state (queue depth, active slots, batch occupancy, prompt / generated token totals) is read from
`engine.stats()` at scrape time by a custom collector, so it is never stale and costs nothing per token.
"""
from __future__ import annotations

import hmac
import json
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets (seconds): CPU test models sit at the low end, big models on slow hosts at the top.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Gauges and totals straight from engine.stats()."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("maxmodel_queue_depth", "requests waiting for free slots", s.get("queue_depth", 0))
        yield GaugeMetricFamily("maxmodel_active_slots", "decode-batch rows in use", s.get("active_slots", 0))
        yield GaugeMetricFamily("maxmodel_max_slots", "decode-batch rows", s.get("max_slots", 0))
        occupancy = s.get("active_slots", 0) / max(1, s.get("max_slots", 1))
        yield GaugeMetricFamily("maxmodel_batch_occupancy", "fraction of decode-batch rows in use", occupancy)
        steps = s.get("steps", 0)
        if steps:
            yield GaugeMetricFamily("maxmodel_mean_batch_occupancy",
                                    "occupied rows per decode step / rows, since start",
                                    s.get("occupied_slot_steps", 0) / steps / max(1, s.get("max_slots", 1)))
        for key, help_ in (("prompt_tokens", "prompt tokens prefilled"),
                           ("generated_tokens", "tokens generated"),
                           ("requests", "requests submitted to the engine"),
                           ("steps", "decode steps run")):
            yield CounterMetricFamily(f"maxmodel_engine_{key}", help_, s.get(key, 0))


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("maxmodel_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("maxmodel_prompt_tokens", "prompt tokens of answered requests",
                                     ["endpoint"], registry=r)
        self.generated_tokens = Counter("maxmodel_generated_tokens", "completion tokens sent to clients",
                                        ["endpoint"], registry=r)
        self.ttft = Histogram("maxmodel_time_to_first_token_seconds", "request received -> first token",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("maxmodel_inter_token_latency_seconds", "time between two tokens of one sequence",
                             ["endpoint"], buckets=ITL_BUCKETS, registry=r)
        self.latency = Histogram("maxmodel_request_duration_seconds", "request received -> last token",
                                 ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str, known: set[str]) -> str:
    return path if path in known else "other"  # unknown paths share one label (no cardinality blow-up)


class CountRequests:
    """Pure ASGI middleware (streams pass through untouched): counts each HTTP request by endpoint and the
    status it was answered with."""

    def __init__(self, app, metrics: Metrics, known_paths: set[str]):
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint_label(scope["path"], self.known), str(status[0])).inc()


class RequireKey:
    """`--api-key`: every request without `Authorization: Bearer KEY` gets 401, except the paths in `open_`
    (/health, for load balancers and orchestrators that probe without credentials)."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.expected, self.open = app, f"Bearer {api_key}".encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Clock:
    """Per-request timing: TTFT once, the gap between consecutive tokens of each sequence."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: dict = {}

    def token(self, key, at: float) -> None:
        if self.first is None:
            self.first = at
            self.metrics.ttft.labels(self.endpoint).observe(at - self.start)
        if key in self.last:
            self.metrics.itl.labels(self.endpoint).observe(at - self.last[key])
        self.last[key] = at

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.start)
        self.metrics.prompt_tokens.labels(self.endpoint).inc(prompt_tokens)
        self.metrics.generated_tokens.labels(self.endpoint).inc(completion_tokens)
