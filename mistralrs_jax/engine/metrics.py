"""Engine counters read by the server (/metrics), the TUI and the benchmarks.

One `EngineMetrics` per engine; the engine loop updates it, readers take `snapshot()`.
Compiles are counted from JAX's own monitoring events, so the count is the real number
of XLA compilations in this process (the zero-recompiles-after-warm-up check uses it).
"""
from __future__ import annotations

import threading
import time
from collections import deque

import jax.monitoring

_compile_lock = threading.Lock()
_compile_count = 0


def _on_duration_event(event: str, duration: float, **kwargs) -> None:
    global _compile_count
    if event == "/jax/core/compile/backend_compile_duration":
        with _compile_lock:
            _compile_count += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


def compile_count() -> int:
    """XLA backend compilations so far in this process."""
    return _compile_count


# Histogram bucket upper bounds in seconds (Prometheus style, cumulative).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        cumulative, running = [], 0
        for c in self.counts:
            running += c
            cumulative.append(running)
        return {"buckets": list(self.buckets), "cumulative_counts": cumulative, "sum": self.total, "count": self.count}


class EngineMetrics:
    """Thread-safe counters; the loop thread writes, any thread reads a snapshot."""

    RATE_WINDOW_S = 10.0

    def __init__(self):
        self._lock = threading.Lock()
        self.start_time = time.time()
        self.compiles_at_start = compile_count()
        self.prompt_tokens_total = 0  # prompt tokens run through the model (excl. prefix-cache hits)
        self.generation_tokens_total = 0
        self.requests_total = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.requests_failed = 0  # ended by an engine error (the model step, the sampler, the detokenizer)
        self.steps_total = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)
        self.gauges: dict = {}

    def record_step(self, prompt_tokens: int, generated_tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps_total += 1
            self.prompt_tokens_total += prompt_tokens
            self.generation_tokens_total += generated_tokens
            self._recent.append((now, prompt_tokens, generated_tokens))
            while self._recent and now - self._recent[0][0] > self.RATE_WINDOW_S:
                self._recent.popleft()

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            getattr(self, name).observe(value)

    def count(self, name: str, delta: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def set_gauges(self, **values) -> None:
        with self._lock:
            self.gauges.update(values)

    def snapshot(self) -> dict:
        with self._lock:
            now = time.monotonic()
            window = [r for r in self._recent if now - r[0] <= self.RATE_WINDOW_S]
            span = max(now - window[0][0], 1e-3) if window else 1.0
            snap = dict(self.gauges)
            snap.update(
                uptime_s=time.time() - self.start_time,
                prompt_tokens_total=self.prompt_tokens_total,
                generation_tokens_total=self.generation_tokens_total,
                requests_total=self.requests_total,
                requests_finished=self.requests_finished,
                requests_aborted=self.requests_aborted,
                requests_failed=self.requests_failed,
                steps_total=self.steps_total,
                prompt_tokens_per_s=sum(r[1] for r in window) / span if window else 0.0,
                generation_tokens_per_s=sum(r[2] for r in window) / span if window else 0.0,
                ttft_s=self.ttft.snapshot(),
                itl_s=self.itl.snapshot(),
                e2e_s=self.e2e.snapshot(),
                compiles=compile_count(),
                compiles_after_warmup=compile_count() - self.compiles_at_start,
            )
        return snap
