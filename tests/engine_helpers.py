"""Small helpers the engine tests share (test_batching.py, test_speculative.py)."""
from __future__ import annotations

import time


def wait_for_idle(llm, timeout: float = 10.0) -> dict:
    """The engine's metrics once nothing runs or waits. The gauges are refreshed after the step
    that finished the last request, so this polls."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = llm.metrics()
        if metrics["num_running"] == 0 and metrics["num_waiting"] == 0:
            return metrics
        assert time.monotonic() < deadline, f"the engine did not go idle: {metrics}"
        time.sleep(0.02)


def assert_all_blocks_free(llm) -> None:
    metrics = wait_for_idle(llm)
    assert metrics["kv_blocks_used"] == 0 and metrics["kv_blocks_free"] == metrics["kv_blocks_total"], metrics
