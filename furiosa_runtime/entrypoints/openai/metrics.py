"""``GET /metrics``: Prometheus metrics of one server, named like vLLM's (``furiosa_llm:`` prefix).

Two sources:

* the engine's state and counters (``AsyncLLMEngine.stats``): running and waiting
  requests, KV-cache blocks, prefix-cache queries and hits, preemptions, steps and the
  modelled NPU seconds, read at each scrape by a collector;
* each finished request, observed by the server: time to first token, time per output
  token and end-to-end latency (wall clock, as the client sees them), prompt and
  generation tokens, and a count by finish reason (``stop``, ``length``, ``abort`` for a
  client that went away).

Every server has its own ``CollectorRegistry``, so several servers in one process (tests)
keep separate figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from furiosa_runtime.engine.core import EngineStats

PREFIX = "furiosa_llm:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; the simulator is slower than the hardware, so the buckets reach far.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


class _EngineCollector(Collector):
    """Reads the engine's stats at every scrape."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        queried, hits = s.prefix_cache_queried_tokens, s.prefix_cache_hit_tokens
        gauges = [
            ("num_requests_running", "Requests holding KV blocks in the engine.", s.running),
            ("num_requests_waiting", "Requests waiting to be admitted.", s.waiting),
            ("num_kv_blocks", "Usable KV-cache blocks.", s.kv_blocks_total),
            ("num_kv_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used),
            ("kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).", s.kv_blocks_used / max(s.kv_blocks_total, 1)),
            ("prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache since start (0 to 1).", hits / max(queried, 1)),
        ]
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queried),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits),
            ("num_preemptions", "Sequences preempted for lack of KV blocks.", s.preemptions),
            ("engine_steps", "Prefill and decode steps run.", s.steps),
            ("npu_seconds", "Modelled NPU time of every step run (timing model, not wall clock).", s.npu_seconds),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family


class ServerMetrics:
    """The metrics of one server: engine state read at scrape time plus per-request figures."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Seconds from request to first token.", TTFT_BUCKETS)
        self.time_per_output_token = histogram("time_per_output_token_seconds", "Mean seconds per output token after the first.", TPOT_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Seconds from request to its end.", E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests served.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter(PREFIX + "request_success", "Requests ended, by finish reason (abort: the client went away).",
                                [*labels, "finished_reason"], registry=self.registry)  # fmt: skip
        self._model_name = model_name

    def observe(self, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                *, ttft: float | None, tpot: float | None, e2e: float) -> None:  # fmt: skip
        """Count one request that ended."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self._success.labels(self._model_name, finish_reason).inc()
        self.e2e_latency.observe(e2e)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        if tpot is not None:
            self.time_per_output_token.observe(tpot)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
