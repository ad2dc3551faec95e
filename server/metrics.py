"""Counters for `GET /metrics`, in Prometheus's text format (no client library needed).

Held by the server state; the request middleware and the serving layer feed it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{upper:g}"}} {n}' for upper, n in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                  f"{name}_count {self.count}"]
        return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Label values are bounded: a client choosing them must not grow /metrics without end.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_ADAPTER_LABELS = 256  # distinct adapter ids counted by name; later ones count as "(other)"


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()   # (method, route, status)
        self.generated_tokens: Counter[str] = Counter()           # by output: steered | base
        self.adapter_requests: Counter[str] = Counter()           # by adapter id ("" = none)
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self.time_to_first_token = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def observe_request(self, method: str, route: str, status: int) -> None:
        self.requests[(method if method in METHODS else "OTHER", route, status)] += 1

    def count_adapter_request(self, adapter_id: str | None) -> None:
        label = adapter_id or ""
        if label not in self.adapter_requests and len(self.adapter_requests) >= MAX_ADAPTER_LABELS:
            label = "(other)"
        self.adapter_requests[label] += 1

    def render(self, queue_depth: int, batch_rows: int, step_failures: int = 0, failed_jobs: int = 0,
               engine_alive: bool = True) -> str:
        out = ["# HELP fsrl_requests_total HTTP requests by route and status.",
               "# TYPE fsrl_requests_total counter"]
        out += [f'fsrl_requests_total{{method="{m}",route="{_label(r)}",status="{s}"}} {n}'
                for (m, r, s), n in sorted(self.requests.items())]
        out += ["# HELP fsrl_generated_tokens_total Tokens generated, by output row.",
                "# TYPE fsrl_generated_tokens_total counter"]
        out += [f'fsrl_generated_tokens_total{{output="{o}"}} {n}'
                for o, n in sorted(self.generated_tokens.items())]
        out += ["# HELP fsrl_adapter_requests_total Generation requests by adapter (\"\": none).",
                "# TYPE fsrl_adapter_requests_total counter"]
        out += [f'fsrl_adapter_requests_total{{adapter="{_label(a)}"}} {n}'
                for a, n in sorted(self.adapter_requests.items())]
        out += ["# HELP fsrl_batch_size Rows in each forward pass of the engine.", "# TYPE fsrl_batch_size histogram"]
        out += self.batch_size.render("fsrl_batch_size")
        out += ["# HELP fsrl_time_to_first_token_seconds From request to first token.",
                "# TYPE fsrl_time_to_first_token_seconds histogram"]
        out += self.time_to_first_token.render("fsrl_time_to_first_token_seconds")
        out += ["# HELP fsrl_queue_depth Requests admitted and not yet answered.",
                "# TYPE fsrl_queue_depth gauge", f"fsrl_queue_depth {queue_depth}",
                "# HELP fsrl_batch_rows Rows in the engine's running batch now.",
                "# TYPE fsrl_batch_rows gauge", f"fsrl_batch_rows {batch_rows}",
                "# HELP fsrl_step_failures_total Generation steps that raised (each retried job by job).",
                "# TYPE fsrl_step_failures_total counter", f"fsrl_step_failures_total {step_failures}",
                "# HELP fsrl_failed_requests_total Requests the engine answered with an error.",
                "# TYPE fsrl_failed_requests_total counter", f"fsrl_failed_requests_total {failed_jobs}",
                "# HELP fsrl_engine_up 1 while the generation worker runs.",
                "# TYPE fsrl_engine_up gauge", f"fsrl_engine_up {int(engine_alive)}"]
        return "\n".join(out) + "\n"


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
