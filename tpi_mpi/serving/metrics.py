"""GET /metrics: the server's counters and histograms, and every rank's, in Prometheus' text format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Engine.counters() field -> (metric name, kind, help)
RANK_FIELDS = {
    "compute_s": ("tpi_rank_compute_seconds", "counter", "seconds in forward passes, communication excluded"),
    "comm_s": ("tpi_rank_comm_seconds", "counter", "seconds in allreduce, broadcast and gather"),
    "disk_wait_s": ("tpi_rank_disk_wait_seconds", "counter", "seconds waiting for streamed weights"),
    "forward_passes": ("tpi_rank_forward_passes", "counter", "forward passes run"),
    "bytes_sent": ("tpi_rank_sent_bytes", "counter", "bytes sent to other ranks"),
    "bytes_received": ("tpi_rank_received_bytes", "counter", "bytes received from other ranks"),
    "rss_bytes": ("tpi_rank_resident_bytes", "gauge", "resident memory"),
}


class _Ranks(Collector):
    """The last report of every rank (Engine.counters through OP_REPORT), taken when /metrics is read."""

    def __init__(self) -> None:
        self.report: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Any]:
        for key, (name, kind, doc) in RANK_FIELDS.items():
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name.removesuffix("_total"), doc, labels=["rank"])
            for r in self.report:
                family.add_metric([str(r["rank"])], float(r[key]))
            yield family


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: a scrape shows what it measures
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tpi_serve_requests", "requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("tpi_serve_prompt_tokens", "prompt tokens", registry=r)
        self.cached_tokens = Counter("tpi_serve_cached_prompt_tokens", "prompt tokens found in the KV cache",
                                     registry=r)
        self.completion_tokens = Counter("tpi_serve_completion_tokens", "generated tokens", registry=r)
        self.cancelled_tokens = Counter("tpi_serve_cancelled_tokens", "tokens generated for clients that then left",
                                        registry=r)
        self.ttft = Histogram("tpi_serve_ttft_seconds", "arrival to first token, queue included",
                              buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("tpi_serve_token_latency_seconds", "time between generated tokens",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("tpi_serve_queue_seconds", "arrival to start of generation",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.waiting = Gauge("tpi_serve_queue_waiting", "requests waiting", registry=r)
        self.running = Gauge("tpi_serve_running", "requests generating (0 or 1)", registry=r)
        self.ranks = _Ranks()
        r.register(self.ranks)

    def finished(self, endpoint: str, outcome: str, result: Any = None, queued_s: float | None = None,
                 generated: int = 0) -> None:
        """`result`: the scheduler's Finished of a completed request; `generated`: tokens of one cancelled."""
        self.requests.labels(endpoint, outcome).inc()
        if outcome == "cancelled":
            self.cancelled_tokens.inc(generated)
        if queued_s is not None:
            self.queue_time.observe(queued_s)
        if result is None:
            return
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        if result.completion_tokens:
            self.ttft.observe(result.ttft_s)
        for t in result.token_latencies_s:
            self.token_latency.observe(t)

    def text(self, report: list[dict[str, Any]], waiting: int, running: bool) -> bytes:
        self.ranks.report = report
        self.waiting.set(waiting)
        self.running.set(int(running))
        return generate_latest(self.registry)
