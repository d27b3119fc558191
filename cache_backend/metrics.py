"""Request counters for `/v1/cache/stats` (JSON) and `/metrics` (Prometheus).

Kept apart from the engine and the cache so each can be read on its own: the engine reports one
finished request here, the cache reports its own state, and the HTTP layer shows both.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class RequestRecord:
    """One finished (or cancelled) /v1/messages request, as scripts read it from /v1/cache/requests."""

    request_id: str
    prompt: int
    restored: int
    prefilled: int
    output: int
    ttft_s: float | None
    queued_s: float
    resumed: bool
    outcome: str  # stop reason, "cancelled", "shutdown" or "failed"


class ServerMetrics:
    RECENT = 512  # request records kept for /v1/cache/requests

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.prefill_tokens_total = 0
        self.cache_read_tokens_total = 0
        self.output_tokens_total = 0
        self._cache_stats: dict[str, Any] = {}
        self.registry = CollectorRegistry()
        # The totals above are the one count; Prometheus reads them at scrape time.
        self.registry.register(_Totals(self))
        self._ttft = Histogram(
            "ccwarm_ttft_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=self.registry
        )
        self._recent: deque[RequestRecord] = deque(maxlen=self.RECENT)

    def record(self, rec: RequestRecord) -> None:
        """Keep the per-request figures (any outcome) for /v1/cache/requests."""
        with self._lock:
            self._recent.append(rec)

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._recent)
        return [asdict(r) for r in items[-limit:]] if limit else [asdict(r) for r in items]

    def observe(self, prompt_tokens: int, restored: int, output_tokens: int, ttft_s: float | None) -> None:
        """One finished request (called on the engine's worker thread)."""
        with self._lock:
            self.requests_total += 1
            self.prompt_tokens_total += prompt_tokens
            self.prefill_tokens_total += prompt_tokens - restored
            self.cache_read_tokens_total += restored
            self.output_tokens_total += output_tokens
        if ttft_s is not None:
            self._ttft.observe(ttft_s)

    def snapshot(self, cache_stats: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "requests_total": self.requests_total,
                "prompt_tokens_total": self.prompt_tokens_total,
                "prefill_tokens_total": self.prefill_tokens_total,
                "cache_read_tokens_total": self.cache_read_tokens_total,
                "output_tokens_total": self.output_tokens_total,
            }
        return {**out, **cache_stats}

    def prometheus(self, cache_stats: dict[str, Any]) -> bytes:
        with self._lock:
            self._cache_stats = {k: v for k, v in cache_stats.items() if isinstance(v, (int, float))}
        return generate_latest(self.registry)


class _Totals(Collector):
    """`ccwarm_*_total` counters and the `ccwarm_cache{field=...}` gauges, read from ServerMetrics."""

    COUNTERS = (
        ("requests", "requests_total", "Finished /v1/messages requests"),
        ("prefill_tokens", "prefill_tokens_total", "Prompt tokens prefilled"),
        ("cache_read_tokens", "cache_read_tokens_total", "Prompt tokens restored from snapshots"),
        ("output_tokens", "output_tokens_total", "Tokens generated"),
    )

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m._lock:
            totals = {attr: getattr(m, attr) for _, attr, _ in self.COUNTERS}
            cache = dict(m._cache_stats)
        for name, attr, doc in self.COUNTERS:
            yield CounterMetricFamily(f"ccwarm_{name}", doc, value=totals[attr])
        gauge = GaugeMetricFamily("ccwarm_cache", "Prefix cache state", labels=["field"])
        for key, value in sorted(cache.items()):
            gauge.add_metric([key], value)
        yield gauge
