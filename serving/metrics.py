"""Prometheus metrics, all named `balansis:…`, on a registry per app.

Where the figures come from:
- latencies, observed by the server as outputs reach the event loop (what
  a client waits for): time to first token, inter-token latency,
  end-to-end latency, queue time (arrival to the prompt's first step,
  stamped by the engine); and request outcomes by finish reason;
- the engine's load and counters (running and waiting sequences, KV cache
  usage, prefix cache queries and hits, prompt and generation tokens) and
  its memory (the KV pool's blocks and bytes, the weights' bytes), read at
  scrape time from the engine's latest `EngineStats` snapshot; and the
  devices' memory in use and limit, where they report it (GPUs);
- embedding requests: latency, inputs and tokens;
- each model's start: the seconds of each phase (engine.startup).

Every series carries the served model's name as `model_name`.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import memory
from engine.outputs import EngineStats, RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                  2.5, 5.0)


class ServingMetrics:
    def __init__(self, *, stats: Callable[[], list[tuple[str, EngineStats]]],
                 startup: Callable[[], list[tuple[str, dict[str, float]]]] = list):
        self.registry = CollectorRegistry()
        labels = ("model_name",)
        self.time_to_first_token = Histogram(
            "balansis:time_to_first_token_seconds", "Arrival to the first generated token.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "balansis:inter_token_latency_seconds", "Time between a request's successive tokens.", labels,
            buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram(
            "balansis:e2e_request_latency_seconds", "Arrival to the last token.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram(
            "balansis:request_queue_time_seconds", "Arrival to the prompt's first engine step.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.stability_score = Histogram(
            "balansis:stability_score", "Per finished choice: the fraction of its tokens whose decision margin "
            "beat twice the LM head's rounding bound.", labels,
            buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0), registry=self.registry)
        self.requests = Counter(
            "balansis:request_success", "Finished requests by finish reason (abort: the client left; "
            "error: the engine failed it).", labels + ("finished_reason",), registry=self.registry)
        self.embedding_latency = Histogram(
            "balansis:embedding_request_latency_seconds", "Arrival to response of an embeddings request.",
            labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.embedding_inputs = Counter(
            "balansis:embedding_inputs", "Inputs embedded.", labels, registry=self.registry)
        self.embedding_tokens = Counter(
            "balansis:embedding_tokens", "Tokens of the inputs embedded.", labels, registry=self.registry)
        self.embedding_requests = Counter(
            "balansis:embedding_requests", "Finished embeddings requests by outcome (ok, abort: the client "
            "left, error).", labels + ("outcome",), registry=self.registry)
        # HTTP: labelled by route template ("/v1/models/{model_id}", "unmatched"), never the raw
        # path, and by a method among HTTP's own, so the labels stay few whatever clients send.
        self.http_requests = Counter(
            "balansis:http_requests", "HTTP requests by method, route template and status.",
            ("method", "route", "status"), registry=self.registry)
        self.http_duration = Histogram(
            "balansis:http_request_duration_seconds", "Request to the response's last byte (a whole stream).",
            ("method", "route"), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.auth_failures = Counter(
            "balansis:auth_failures", "Requests refused for missing or bad credentials (401).",
            registry=self.registry)
        self.rate_limited = Counter(
            "balansis:rate_limited", "Requests refused by a limit (429), by the limit's reason: requests, "
            "tokens, tokens_per_day, max_parallel (a key's or user's budget) or auth_failures (an address's).",
            ("reason",), registry=self.registry)
        self.usage_records_dropped = Counter(
            "balansis:usage_records_dropped", "Usage records lost: the database could not take them (or "
            "their queue was full).", registry=self.registry)
        self.rate_limits_unavailable = Counter(
            "balansis:rate_limits_unavailable", "Requests served without rate limits because their store "
            "(Redis) could not be reached.", registry=self.registry)
        self.registry.register(_EngineCollector(stats, memory.device_memory))
        self.registry.register(_StartupCollector(startup))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, model: str) -> "RequestTracker":
        return RequestTracker(self, model)

    def count_outcome(self, model: str, reason: str) -> None:
        self.requests.labels(model, reason).inc()

    def count_embeddings(self, model: str, *, started: float, outcome: str, num_inputs: int = 0,
                         num_tokens: int = 0) -> None:
        """Record an embeddings request that arrived at `started` (time.time())."""
        self.embedding_requests.labels(model, outcome).inc()
        if outcome == "ok":
            self.embedding_latency.labels(model).observe(time.time() - started)
            self.embedding_inputs.labels(model).inc(num_inputs)
            self.embedding_tokens.labels(model).inc(num_tokens)


class RequestTracker:
    """Times one request (all its choices) from the outputs the server receives."""

    def __init__(self, metrics: ServingMetrics, model: str):
        self._metrics = metrics
        self._model = model
        self._is_started = False
        self._num_tokens: dict[int, int] = {}  # per choice
        self._last_token_at: dict[int, float] = {}

    def observe(self, output: RequestOutput) -> None:
        now = time.time()
        model = self._model
        for choice in output.outputs:
            new = len(choice.token_ids) - self._num_tokens.get(choice.index, 0)
            if new <= 0:
                continue
            if not self._is_started:
                self._is_started = True
                self._metrics.time_to_first_token.labels(model).observe(now - output.arrival_time)
            last = self._last_token_at.get(choice.index)
            if last is not None:
                gap = (now - last) / new  # tokens of one choice that arrived together share the gap
                for _ in range(new):
                    self._metrics.inter_token_latency.labels(model).observe(gap)
            self._num_tokens[choice.index] = len(choice.token_ids)
            self._last_token_at[choice.index] = now

    def finish(self, output: RequestOutput | None, reason: str) -> None:
        """Record the outcome: a finish reason, "abort" or "error"."""
        model = self._model
        if output is not None:
            self._metrics.e2e_latency.labels(model).observe(time.time() - output.arrival_time)
            for choice in output.outputs:
                if choice.stability is not None:
                    self._metrics.stability_score.labels(model).observe(choice.stability.score)
            if output.first_scheduled_time is not None:
                self._metrics.queue_time.labels(model).observe(output.first_scheduled_time - output.arrival_time)
        self._metrics.count_outcome(model, reason)


class _StartupCollector(Collector):
    """`balansis:startup_seconds{model_name, phase}`: each finished phase of each model's start."""

    def __init__(self, startup: Callable[[], list[tuple[str, dict[str, float]]]]):
        self._startup = startup

    def collect(self):
        metric = GaugeMetricFamily("balansis:startup_seconds", "Seconds each start-up phase of a model took "
                                   "(load, place, compile, and ready: the whole start).",
                                   labels=["model_name", "phase"])
        for model, phases in self._startup():
            for phase, seconds in phases.items():
                metric.add_metric([model, phase], seconds)
        yield metric


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], list[tuple[str, EngineStats]]],
                 device_memory: Callable[[], list[tuple[str, int, int]]]):
        self._stats = stats
        self._device_memory = device_memory

    def collect(self):
        snapshots = self._stats()  # models still loading have nothing to report yet
        if not snapshots:
            return

        def family(kind, name, doc, field):
            metric = kind(name, doc, labels=["model_name"])
            for model, stats in snapshots:
                metric.add_metric([model], getattr(stats, field))
            return metric

        yield family(GaugeMetricFamily, "balansis:num_requests_running", "Sequences holding KV cache blocks.",
                     "num_running")
        yield family(GaugeMetricFamily, "balansis:num_requests_waiting",
                     "Sequences waiting for their prompt to run.", "num_waiting")
        yield family(GaugeMetricFamily, "balansis:kv_cache_usage_perc",
                     "Fraction of KV cache blocks in use (0 to 1).", "kv_cache_usage")
        yield family(CounterMetricFamily, "balansis:prefix_cache_queries",
                     "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries")
        yield family(CounterMetricFamily, "balansis:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     "prefix_cache_hits")
        yield family(CounterMetricFamily, "balansis:prompt_tokens", "Prompt tokens computed.", "num_prompt_tokens")
        yield family(CounterMetricFamily, "balansis:generation_tokens", "Tokens generated.",
                     "num_generation_tokens")
        yield family(CounterMetricFamily, "balansis:num_preemptions", "Sequences preempted for KV cache space.",
                     "num_preemptions")
        yield family(GaugeMetricFamily, "balansis:kv_cache_blocks_total", "Blocks in the KV cache pool.",
                     "num_kv_blocks")
        yield family(GaugeMetricFamily, "balansis:kv_cache_memory_bytes",
                     "Bytes of the KV cache pool (K and V, every layer, all devices).", "kv_cache_bytes")
        yield family(GaugeMetricFamily, "balansis:model_memory_bytes", "Bytes of the model's weights (all devices).",
                     "weight_bytes")
        devices = self._device_memory()
        if devices:  # GPUs report their memory; CPUs do not
            used = GaugeMetricFamily("balansis:device_memory_used_bytes", "Device memory allocated by this process.",
                                     labels=["device"])
            limit = GaugeMetricFamily("balansis:device_memory_limit_bytes",
                                      "Device memory this process may allocate (JAX's pool).", labels=["device"])
            for device, in_use, bytes_limit in devices:
                used.add_metric([device], in_use)
                limit.add_metric([device], bytes_limit)
            yield used
            yield limit
