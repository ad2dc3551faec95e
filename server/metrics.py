"""`GET /metrics` through prometheus_client, on a registry of the app's own (held by the server
state, so nothing outlives the app). The request middleware and the serving layer feed the
counters and histograms; the engine's figures are read when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Label values are bounded: a client choosing them must not grow /metrics without end.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_ADAPTER_LABELS = 256  # distinct adapter ids counted by name; later ones count as "(other)"
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class EngineFigures:
    queue_depth: int      # requests admitted and not yet answered
    batch_rows: int       # rows in the running batch now
    step_failures: int    # steps that raised (each followed by a recovery)
    failed_jobs: int      # requests the engine answered with an error
    alive: bool           # the worker runs


class _EngineCollector:
    """The engine's figures, read at scrape time."""

    def __init__(self, read: Callable[[], EngineFigures]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        f = self.read()
        yield GaugeMetricFamily("fsrl_queue_depth", "Requests admitted and not yet answered.", value=f.queue_depth)
        yield GaugeMetricFamily("fsrl_batch_rows", "Rows in the engine's running batch now.", value=f.batch_rows)
        yield CounterMetricFamily("fsrl_step_failures", "Generation steps that raised (each retried job by job).",
                                  value=f.step_failures)
        yield CounterMetricFamily("fsrl_failed_requests", "Requests the engine answered with an error.",
                                  value=f.failed_jobs)
        yield GaugeMetricFamily("fsrl_engine_up", "1 while the generation worker runs.", value=int(f.alive))


class _AdapterCollector:
    """Adapters loaded and the memory their weights hold, read at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        loaded, held = self.read()
        yield GaugeMetricFamily("fsrl_adapters_loaded", "Adapters loaded now.", value=loaded)
        yield GaugeMetricFamily("fsrl_adapter_bytes", "Bytes the loaded adapters' weights hold.", value=held)


class _PagingCollector:
    """The device slots adapters are paged into (`--adapter-slots`), read at scrape time."""

    def __init__(self, pager) -> None:
        self.pager = pager

    def collect(self) -> Iterator[Metric]:
        p = self.pager
        yield GaugeMetricFamily("fsrl_adapter_slots", "Device slots for adapters (--adapter-slots).", value=p.slots)
        yield GaugeMetricFamily("fsrl_adapter_slots_used", "Adapter versions on the device now.", value=len(p))
        yield CounterMetricFamily("fsrl_adapter_page_ins", "Adapter versions copied onto the device.", value=p.page_ins)
        yield CounterMetricFamily("fsrl_adapter_evictions", "Adapter versions sent out of the device to make room.",
                                  value=p.evictions)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fsrl_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.generated_tokens = Counter("fsrl_generated_tokens", "Tokens generated, by output row.",
                                        ["output"], registry=self.registry)
        self.adapter_requests = Counter("fsrl_adapter_requests", 'Generation requests by adapter ("": none).',
                                        ["adapter"], registry=self.registry)
        self.batch_size = Histogram("fsrl_batch_size", "Rows in each forward pass of the engine.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.time_to_first_token = Histogram("fsrl_time_to_first_token_seconds", "From request to first token.",
                                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                             registry=self.registry)
        self._adapter_labels: set[str] = set()

    def read_engine_with(self, read: Callable[[], EngineFigures]) -> None:
        """Where the engine's figures come from (set once the engine exists)."""
        self.registry.register(_EngineCollector(read))

    def read_adapters_with(self, read: Callable[[], tuple[int, int]]) -> None:
        """Where the adapter figures come from (the registry's `memory`)."""
        self.registry.register(_AdapterCollector(read))

    def read_paging_from(self, pager) -> None:
        """The engine's `server.paging.SlotPager`, when it pages adapters."""
        self.registry.register(_PagingCollector(pager))

    def observe_request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method if method in METHODS else "OTHER", route, str(status)).inc()

    def count_adapter_request(self, adapter_id: str | None) -> None:
        label = adapter_id or ""
        if label not in self._adapter_labels:
            if len(self._adapter_labels) >= MAX_ADAPTER_LABELS:
                label = "(other)"
            self._adapter_labels.add(label)
        self.adapter_requests.labels(label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every HTTP request by method, route template and status (pure ASGI, so
    streamed responses are counted too). Unknown paths count as one route, "unmatched"."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception that escapes every handler is answered with a 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            state = (scope.get("state") or {}).get("fsrl")
            if state is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                state.metrics.observe_request(scope["method"], route, status)
