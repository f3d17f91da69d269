"""A short soak (benchmarks/soak.py) against a real server process on the default model: mixed
traffic at concurrency 32 with clients that drop streams and abandon requests. No 5xx, no KV
block left in use once idle, RSS growth under 5% after warm-up. (The long run: `python -m
benchmarks.soak --duration 600`, figures in benchmarks/README.md.)"""
from __future__ import annotations

import pytest

DURATION_S = 75
WARMUP_S = 20


@pytest.mark.slow
def test_short_soak_serves_without_errors_or_leaks(smollm2_gguf_path):
    from benchmarks.soak import KINDS, run

    report = run(duration=DURATION_S, warmup=WARMUP_S, concurrency=32, seed=1)
    print({k: v for k, v in report.items() if k != "rss_samples"})
    assert report["server_errors_5xx"] == 0, report["statuses"]
    assert not report["client_errors"], report["client_errors"]
    assert report["leaked_kv_blocks"] == 0 and report["requests_left_in_engine"] == 0
    assert report["rss_growth"] is not None and report["rss_growth"] < 0.05, report["rss_samples"]
    assert set(report["by_kind"]) == set(KINDS)  # every kind of traffic was sent
    assert report["completed"] >= 50
    assert all(window["p99_s"] is not None for window in report["latency_windows"])
