"""What the dashboard shows, computed from what a server reports (no UI code here).

Sources, best first: the JSON of `GET /v1/status` (mistralrs-jax: the engine's metrics
snapshot plus model and engine settings), then the Prometheus text of `GET /metrics`
(`mistralrs_*` families) for servers that only have that. A number neither source has
stays None and the panel says so, rather than showing a made-up zero.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .memory import MemoryReading

PROMETHEUS_PREFIX = "mistralrs_"
# snapshot key -> the /metrics sample that carries the same number (see server/prometheus.py)
PROMETHEUS_NAMES = {
    "num_waiting": "num_requests_waiting",
    "num_running": "num_requests_running",
    "num_preempted": "num_preemptions_total",
    "kv_blocks_total": "kv_cache_blocks_total",
    "kv_blocks_free": "kv_cache_blocks_free",
    "kv_blocks_used": "kv_cache_blocks_used",
    "block_size": "kv_cache_block_size_tokens",
    "prefix_cache_hits": "prefix_cache_hits_total",
    "prefix_cache_queries": "prefix_cache_queries_total",
    "prompt_tokens_total": "prompt_tokens_total",
    "generation_tokens_total": "generation_tokens_total",
    "prompt_tokens_per_s": "prompt_tokens_per_second",
    "generation_tokens_per_s": "generation_tokens_per_second",
    "requests_total": "requests_total",
    "requests_finished": "requests_finished_total",
    "requests_aborted": "requests_aborted_total",
    "compiles": "xla_compiles_total",
    "compiles_after_warmup": "xla_compiles_after_warmup_total",
}


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value for the unlabelled-but-`model` samples of a /metrics page."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if set(sample.labels) <= {"model"}:
                values[sample.name] = sample.value
    return values


@dataclass
class RequestRow:
    """One row of the request table."""

    request_id: str
    source: str  # "engine" (the server's snapshot) or "chat" (this dashboard's own stream)
    status: str
    prompt_tokens: int | None
    output_tokens: int
    tokens_per_s: float | None
    age_s: float | None


@dataclass
class DashboardView:
    reachable: bool = False
    error: str | None = None
    model: str | None = None
    waiting: int | None = None
    running: int | None = None
    preempted_total: int | None = None
    requests_total: int | None = None
    requests_finished: int | None = None
    requests_aborted: int | None = None
    kv_blocks_total: int | None = None
    kv_blocks_used: int | None = None
    kv_blocks_free: int | None = None
    block_size: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_queries: int | None = None
    prompt_tokens_total: int | None = None
    generation_tokens_total: int | None = None
    window_prompt_tokens_per_s: float | None = None  # the engine's own recent-window rates
    window_generation_tokens_per_s: float | None = None
    compiles: int | None = None
    compiles_after_warmup: int | None = None
    memory: MemoryReading | None = None
    mesh_devices: list[dict] | None = None  # /v1/status mesh.per_device: bytes each device holds
    engine_requests: list[RequestRow] | None = None  # None: the server reports no per-request data

    @property
    def prefix_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries:
            return None
        return (self.prefix_cache_hits or 0) / self.prefix_cache_queries


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _engine_requests(metrics: dict[str, Any]) -> list[RequestRow] | None:
    """Per-request rows from the snapshot's `requests` list, when the engine publishes one."""
    entries = metrics.get("requests")
    if not isinstance(entries, list):
        return None
    rows = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        request_id = str(entry.get("request_id", "?"))
        if entry.get("index"):
            request_id += f"#{entry['index']}"
        rows.append(RequestRow(request_id, "engine", str(entry.get("status", "?")), _int(entry.get("prompt_tokens")),
                               int(entry.get("output_tokens") or 0), entry.get("tokens_per_s"), entry.get("age_s")))
    return rows


def build_view(status: dict[str, Any] | None, prometheus: dict[str, float] | None,
               error: str | None = None) -> DashboardView:
    """Merge one poll of /v1/status (JSON) and /metrics (parsed) into a view."""
    view = DashboardView(reachable=status is not None or prometheus is not None, error=error)
    metrics: dict[str, Any] = dict((status or {}).get("metrics") or {})
    for key, sample in PROMETHEUS_NAMES.items():
        if metrics.get(key) is None and prometheus and PROMETHEUS_PREFIX + sample in prometheus:
            metrics[key] = prometheus[PROMETHEUS_PREFIX + sample]
    view.model = ((status or {}).get("model") or {}).get("id")
    view.waiting, view.running = _int(metrics.get("num_waiting")), _int(metrics.get("num_running"))
    view.preempted_total = _int(metrics.get("num_preempted"))
    view.requests_total = _int(metrics.get("requests_total"))
    view.requests_finished = _int(metrics.get("requests_finished"))
    view.requests_aborted = _int(metrics.get("requests_aborted"))
    view.kv_blocks_total = _int(metrics.get("kv_blocks_total"))
    view.kv_blocks_used = _int(metrics.get("kv_blocks_used"))
    view.kv_blocks_free, view.block_size = _int(metrics.get("kv_blocks_free")), _int(metrics.get("block_size"))
    view.prefix_cache_hits = _int(metrics.get("prefix_cache_hits"))
    view.prefix_cache_queries = _int(metrics.get("prefix_cache_queries"))
    view.prompt_tokens_total = _int(metrics.get("prompt_tokens_total"))
    view.generation_tokens_total = _int(metrics.get("generation_tokens_total"))
    view.window_prompt_tokens_per_s = metrics.get("prompt_tokens_per_s")
    view.window_generation_tokens_per_s = metrics.get("generation_tokens_per_s")
    view.compiles = _int(metrics.get("compiles"))
    view.compiles_after_warmup = _int(metrics.get("compiles_after_warmup"))
    memory = (status or {}).get("memory")
    if isinstance(memory, dict):
        view.memory = MemoryReading.from_dict(memory, source="server /v1/status")
    mesh = (status or {}).get("mesh")
    if isinstance(mesh, dict) and isinstance(mesh.get("per_device"), list):
        view.mesh_devices = mesh["per_device"]
    view.engine_requests = _engine_requests(metrics)
    return view


@dataclass
class ThroughputHistory:
    """Prompt and generation tok/s per poll, from the token counters' change since the last poll.

    Counter deltas follow load within one poll interval; the engine's own rates average
    over ten seconds and are the fallback when a server has no counters.
    """

    length: int = 120
    prompt: deque = field(default_factory=deque)
    generation: deque = field(default_factory=deque)
    _last: tuple[float, int, int] | None = None

    def add(self, view: DashboardView, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if view.prompt_tokens_total is not None and view.generation_tokens_total is not None:
            current = (now, view.prompt_tokens_total, view.generation_tokens_total)
            if self._last is not None and now > self._last[0]:
                elapsed = now - self._last[0]
                self._push(max(0, current[1] - self._last[1]) / elapsed, max(0, current[2] - self._last[2]) / elapsed)
            self._last = current
        elif view.window_generation_tokens_per_s is not None:
            self._push(view.window_prompt_tokens_per_s or 0.0, view.window_generation_tokens_per_s)

    def _push(self, prompt_rate: float, generation_rate: float) -> None:
        for series, value in ((self.prompt, prompt_rate), (self.generation, generation_rate)):
            series.append(value)
            while len(series) > self.length:
                series.popleft()
