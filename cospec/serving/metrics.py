"""``/metrics`` on prometheus-client: counters, latency histograms and speculative-decoding counters, and the
engine's gauges.

Counters and histograms are computed on the HTTP side from the outputs each request receives, so they mean the same
whether the engine runs in this process or on several Ray Serve replicas; latencies are measured with this
process's clock from the moment the request arrived (time to first token includes tokenizing and queueing). Queue
time is the engine's own: from adding the request to its first scheduled step. The gauges (queue lengths, KV
blocks) are read from the engine side when scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cospec.engine.sequence import RequestOutput
from cospec.serving.engine_client import EngineGauges

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM's (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The server's registry. Written from the event loop only; ``engine_gauges`` is called at each scrape."""

    def __init__(self, engine_gauges: Callable[[], EngineGauges]) -> None:
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter("cospec_http_requests", "HTTP requests to /v1 by response status", ["status"],
                                     registry=registry)
        self.finished = Counter("cospec_requests_finished", "Sequences (one per choice) finished, by reason",
                                ["reason"], registry=registry)
        self.prompt_tokens = Counter("cospec_prompt_tokens", "Prompt tokens admitted", registry=registry)
        self.generation_tokens = Counter("cospec_generation_tokens", "Tokens generated", registry=registry)
        self.prefix_cache_queries = Counter("cospec_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache", registry=registry)
        self.prefix_cache_hits = Counter("cospec_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         registry=registry)
        self.drafted_tokens = Counter("cospec_spec_draft_tokens", "Draft tokens proposed", registry=registry)
        self.accepted_tokens = Counter("cospec_spec_accepted_tokens", "Draft tokens accepted", registry=registry)
        self.accepted_per_position = Counter(
            "cospec_spec_accepted_tokens_per_position", "Draft tokens accepted at each draft position (1 = first)",
            ["position"], registry=registry)
        self.time_to_first_token = Histogram(
            "cospec_time_to_first_token_seconds", "From the request's arrival to its first token", registry=registry,
            buckets=_TTFT_BUCKETS)
        self.time_per_output_token = Histogram(
            "cospec_time_per_output_token_seconds", "Between a choice's first and last token, per later token",
            registry=registry, buckets=_TPOT_BUCKETS)
        self.e2e_latency = Histogram("cospec_e2e_request_latency_seconds", "From arrival to the last token",
                                     registry=registry, buckets=_REQUEST_BUCKETS)
        self.queue_time = Histogram("cospec_request_queue_time_seconds",
                                    "In the engine's waiting queue before its first scheduled step", registry=registry,
                                    buckets=_REQUEST_BUCKETS)
        self.num_drafted = self.num_accepted = 0  # totals for the acceptance rate
        registry.register(_EngineCollector(engine_gauges, self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request(self, num_prompt_tokens: int, arrival_time: float) -> RequestMetrics:
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestMetrics(self, arrival_time)


class RequestMetrics:
    """One request's part of the metrics: what of its outputs is counted so far."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float) -> None:
        self.metrics, self.arrival_time = metrics, arrival_time
        self.is_first_token_seen = False
        self._seen: dict[int, _ChoiceSeen] = {}

    def update(self, out: RequestOutput) -> None:
        """Count what ``out`` (a snapshot of one choice) adds to what was seen of its choice."""
        m, now = self.metrics, time.perf_counter()
        seen = self._seen.setdefault(out.index, _ChoiceSeen())
        stats = out.stats
        if not self.is_first_token_seen and out.output_token_ids:
            self.is_first_token_seen = True
            m.time_to_first_token.observe(now - self.arrival_time)
            if stats.queue_time is not None:
                m.queue_time.observe(stats.queue_time)
        if seen.first_token_time is None and out.output_token_ids:
            seen.first_token_time = now
            m.prefix_cache_queries.inc(stats.num_prompt_tokens)
            m.prefix_cache_hits.inc(stats.num_cached_prompt_tokens)
        m.generation_tokens.inc(len(out.output_token_ids) - seen.num_tokens)
        m.drafted_tokens.inc(stats.num_drafted_tokens - seen.num_drafted)
        m.accepted_tokens.inc(stats.num_accepted_tokens - seen.num_accepted)
        m.num_drafted += stats.num_drafted_tokens - seen.num_drafted
        m.num_accepted += stats.num_accepted_tokens - seen.num_accepted
        # histogram[a] counts verify windows that accepted exactly a drafts; a window accepting a drafts accepted
        # one at each position 1..a.
        histogram = stats.acceptance_histogram
        new_windows = [n - (seen.histogram[a] if a < len(seen.histogram) else 0) for a, n in enumerate(histogram)]
        for position in range(1, len(new_windows)):
            accepted_here = sum(new_windows[position:])
            if accepted_here:
                m.accepted_per_position.labels(position=str(position)).inc(accepted_here)
        seen.num_tokens, seen.num_drafted, seen.num_accepted = (len(out.output_token_ids), stats.num_drafted_tokens,
                                                                 stats.num_accepted_tokens)
        seen.histogram = list(histogram)

    def finish_choice(self, index: int, num_tokens: int, reason: str) -> None:
        m, now = self.metrics, time.perf_counter()
        m.finished.labels(reason=reason).inc()
        seen = self._seen.get(index)
        if seen is not None and seen.first_token_time is not None and num_tokens > 1:
            m.time_per_output_token.observe((now - seen.first_token_time) / (num_tokens - 1))

    def finish(self) -> None:
        """Every choice has ended normally."""
        self.metrics.e2e_latency.observe(time.perf_counter() - self.arrival_time)


class _ChoiceSeen:
    __slots__ = ("num_tokens", "num_drafted", "num_accepted", "histogram", "first_token_time")

    def __init__(self) -> None:
        self.num_tokens = self.num_drafted = self.num_accepted = 0
        self.histogram: list[int] = []
        self.first_token_time: float | None = None


class _EngineCollector(Collector):
    """Gauges read at scrape time: the engine's state, and the acceptance rate so far."""

    def __init__(self, engine_gauges: Callable[[], EngineGauges], metrics: ServerMetrics) -> None:
        self.engine_gauges, self.metrics = engine_gauges, metrics

    def collect(self):
        gauges, m = self.engine_gauges(), self.metrics
        yield GaugeMetricFamily("cospec_num_requests_waiting", "Sequences waiting for the engine",
                                value=gauges.num_waiting)
        yield GaugeMetricFamily("cospec_num_requests_running", "Sequences the engine is running",
                                value=gauges.num_running)
        yield GaugeMetricFamily("cospec_kv_blocks_used", "KV cache blocks in use", value=gauges.kv_blocks_used)
        yield GaugeMetricFamily("cospec_kv_blocks_total", "KV cache blocks in the pool", value=gauges.kv_blocks_total)
        yield GaugeMetricFamily("cospec_spec_acceptance_rate", "Accepted / drafted tokens since start",
                                value=m.num_accepted / m.num_drafted if m.num_drafted else 0.0)
