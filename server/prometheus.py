"""`GET /metrics`: the engine's metrics snapshot in Prometheus' text format.

A custom collector turns each `llm.metrics()` snapshot into metric families at scrape
time, so the numbers are the very counters the dashboard and the benchmarks read.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "mistralrs_"

# snapshot key -> (metric name, help). Gauges are levels; counters only ever grow.
GAUGES = {
    "kv_blocks_total": ("kv_cache_blocks_total", "KV cache blocks in the pool"),
    "kv_blocks_free": ("kv_cache_blocks_free", "KV cache blocks no sequence holds (evictable prefix-cache blocks included)"),
    "kv_blocks_used": ("kv_cache_blocks_used", "KV cache blocks held by sequences"),
    "block_size": ("kv_cache_block_size_tokens", "tokens per KV cache block"),
    "num_waiting": ("num_requests_waiting", "sequences waiting to be scheduled"),
    "num_running": ("num_requests_running", "sequences running"),
    "prompt_tokens_per_s": ("prompt_tokens_per_second", "prompt tokens processed per second (recent window)"),
    "generation_tokens_per_s": ("generation_tokens_per_second", "tokens generated per second (recent window)"),
    "uptime_s": ("engine_uptime_seconds", "seconds since the engine started"),
    "spec_acceptance_rate": ("speculative_acceptance_ratio",
                             "draft tokens accepted / draft tokens proposed (speculative decoding)"),
}
COUNTERS = {
    "num_preempted": ("num_preemptions", "sequences preempted (recomputed later) because KV blocks ran out"),
    "prefix_cache_hits": ("prefix_cache_hits", "prompt blocks found in the prefix cache"),
    "prefix_cache_queries": ("prefix_cache_queries", "prompt blocks looked up in the prefix cache"),
    "prompt_tokens_total": ("prompt_tokens", "prompt tokens run through the model (prefix-cache hits excluded)"),
    "generation_tokens_total": ("generation_tokens", "tokens generated"),
    "requests_total": ("requests", "requests received by the engine"),
    "requests_finished": ("requests_finished", "requests finished (aborted ones included)"),
    "requests_aborted": ("requests_aborted", "requests aborted"),
    "requests_failed": ("requests_failed", "requests ended by an engine error (model step, sampler, detokenizer)"),
    "steps_total": ("engine_steps", "engine steps run"),
    "compiles": ("xla_compiles", "XLA compilations in this process (warm-up included)"),
    "spec_draft_tokens_total": ("speculative_draft_tokens", "draft tokens proposed and checked by the target model"),
    "spec_accepted_tokens_total": ("speculative_accepted_tokens", "draft tokens the target model accepted"),
}
HISTOGRAMS = {
    "ttft_s": ("time_to_first_token_seconds", "time from arrival to the first generated token"),
    "itl_s": ("inter_token_latency_seconds", "time between consecutive generated tokens of a sequence"),
    "e2e_s": ("e2e_request_latency_seconds", "time from arrival to the end of a request"),
}


def _histogram(name: str, doc: str, snap: dict[str, Any], labels: dict[str, str]) -> Metric:
    family = HistogramMetricFamily(PREFIX + name, doc, labels=list(labels))
    bounds = [str(float(b)) for b in snap["buckets"]] + ["+Inf"]
    family.add_metric(list(labels.values()), list(zip(bounds, snap["cumulative_counts"])), snap["sum"])
    return family


class EngineCollector:
    """Reads a fresh snapshot per scrape. `extra()` adds server-side numbers (HTTP responses)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], model_name: str,
                 compiles_at_start: Callable[[], int | None],
                 http_responses: Callable[[], dict[tuple[str, int], int]]):
        self._snapshot = snapshot
        self._model = model_name
        self._compiles_at_start = compiles_at_start
        self._http_responses = http_responses

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        labels = {"model": self._model}
        info = GaugeMetricFamily(PREFIX + "model_info", "the served model (value is always 1)", labels=["model"])
        info.add_metric([self._model], 1)
        yield info
        for key, (name, doc) in GAUGES.items():
            if key in snap:
                family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
                family.add_metric(list(labels.values()), float(snap[key]))
                yield family
        total, free = snap.get("kv_blocks_total"), snap.get("kv_blocks_free")
        if total:
            usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "fraction of KV cache blocks in use",
                                      labels=list(labels))
            usage.add_metric(list(labels.values()), (total - free) / total)
            yield usage
        for key, (name, doc) in COUNTERS.items():
            if key in snap:
                family = CounterMetricFamily(PREFIX + name, doc, labels=list(labels))
                family.add_metric(list(labels.values()), float(snap[key]))
                yield family
        at_start = self._compiles_at_start()
        if at_start is not None and "compiles" in snap:
            family = CounterMetricFamily(PREFIX + "xla_compiles_after_warmup",
                                         "XLA compilations since warm-up ended (should stay 0)", labels=list(labels))
            family.add_metric(list(labels.values()), float(snap["compiles"] - at_start))
            yield family
        for key, (name, doc) in HISTOGRAMS.items():
            if key in snap:
                yield _histogram(name, doc, snap[key], labels)
        responses = CounterMetricFamily(PREFIX + "http_responses", "HTTP responses by route and status",
                                        labels=["route", "status"])
        for (route, status), count in sorted(self._http_responses().items()):
            responses.add_metric([route, str(status)], count)
        yield responses


def make_registry(collector: EngineCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
