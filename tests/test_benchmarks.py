"""The serving benchmark end to end against the live in-process server (tiny settings: the
figures are not asserted, the files and their fields are), plus its statistics against
independent references (numpy's percentiles, the exponential distribution's mean)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import serving
from benchmarks.machine import describe_machine
from mistralrs_jax import cli

pytest_plugins = ["server_fixtures"]

MAX_TOKENS = 4
NUM_REQUESTS = 3
SUMMARY_FIELDS = {"completed", "failed", "duration_s", "request_throughput", "output_throughput", "ttft_s",
                  "tpot_s", "itl_s", "e2e_s", "token_count_source", "total_output_tokens"}
MACHINE_FIELDS = {"cpu_model", "threads", "jax", "jax_backend", "python"}


def _result_folder(out: Path) -> Path:
    folders = sorted(out.glob("serving-*"))
    assert len(folders) == 1, folders
    return folders[0]


def _check_files(folder: Path, levels: list[str]) -> dict:
    result = json.loads((folder / "serving.json").read_text(encoding="utf-8"))
    assert MACHINE_FIELDS <= set(result["machine"])
    assert result["machine"]["cpu_model"] and result["machine"]["threads"] >= 1
    assert "api_key" not in result["settings"]
    assert [serving.level_label(level) for level in result["levels"]] == levels
    for level in result["levels"]:
        summary = level["summary"]
        assert SUMMARY_FIELDS <= set(summary)
        assert summary["completed"] == NUM_REQUESTS and summary["failed"] == 0
        assert summary["token_count_source"] == "usage"
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(summary[metric]) == {"mean", "median", "p99"}
        assert len(level["requests"]) == NUM_REQUESTS
        for request in level["requests"]:
            # ignore_eos: the server generates exactly max_tokens, and says so in its usage.
            assert request["ok"] and request["output_tokens"] == MAX_TOKENS and request["prompt_tokens"] > 0
            assert 0 < request["ttft"] <= request["latency"]
            assert request["tpot"] == pytest.approx((request["latency"] - request["ttft"]) / (MAX_TOKENS - 1))
            assert len(request["itl"]) == request["text_chunks"] - 1
    table = (folder / "serving.md").read_text(encoding="utf-8")
    assert result["machine"]["cpu_model"] in table
    assert "| level | ok/failed | req/s | output tok/s | TTFT ms | TPOT ms | ITL ms | E2E ms |" in table
    assert all(f"| {label} | {NUM_REQUESTS}/0 |" in table for label in levels)
    with Image.open(folder / "serving.png") as image:
        assert image.format == "PNG" and image.width > 400
        assert json.loads(image.text["Description"])["cpu_model"] == result["machine"]["cpu_model"]
    return result


def test_serving_benchmark_from_the_command_line(live_server, tmp_path):
    """`mistralrs-jax bench serving`: a concurrency sweep, every file written with its fields."""
    code = cli.main(["bench", "serving", "--url", f"{live_server.url}/v1", "--concurrency", "1,2",
                     "--num-requests", str(NUM_REQUESTS), "--max-tokens", str(MAX_TOKENS), "--prompt-words", "8",
                     "--out", str(tmp_path)])
    assert code == 0
    result = _check_files(_result_folder(tmp_path), ["c=1", "c=2"])
    assert result["server"]["model"] == live_server.llm.model_name
    assert result["server"]["status"]["engine"]["config"]["max_seqs"] == live_server.llm.engine_config.max_seqs


def test_serving_benchmark_poisson_rates_on_completions(live_server, tmp_path):
    """Open-loop levels (a Poisson rate and `inf`) on the text-completions route."""
    config = serving.ServingConfig(url=live_server.url, endpoint="completions", request_rates=[20.0, math.inf],
                                   num_requests=NUM_REQUESTS, max_tokens=MAX_TOKENS, prompt_words=8,
                                   warmup_requests=0, out=str(tmp_path))
    result, folder = serving.run(config)
    _check_files(folder, ["rate=20/s", "rate=inf"])
    starts = [r["start"] for r in result["levels"][1]["requests"]]
    assert max(starts) < 0.5  # rate inf: all sent at once


def test_serving_benchmark_unreachable_server_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["bench", "serving", "--url", "http://127.0.0.1:9", "--out", str(tmp_path)])
    assert code == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_pp_tg_delegates_to_bench_engine(capsys):
    """`mistralrs-jax bench pp-tg ARGS` hands ARGS to benchmarks.bench_engine's own parser."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "pp-tg", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--pp" in out and "--tg" in out and "--engines" in out


def test_percentiles_match_numpy():
    values = list(np.random.default_rng(0).lognormal(size=257))
    summary = serving.distribution(values)
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["median"] == pytest.approx(np.percentile(values, 50))
    assert summary["p99"] == pytest.approx(np.percentile(values, 99))
    assert serving.distribution([]) == {"mean": None, "median": None, "p99": None}


def test_poisson_arrivals_have_exponential_gaps():
    offsets = serving.poisson_arrivals(4000, rate=4.0, seed=1)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps > 0)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)  # mean 1/rate
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.08)  # exponential: sd == mean
    assert serving.poisson_arrivals(5, rate=math.inf, seed=1) == [0.0] * 5


def test_machine_description_leaves_jax_backend_alone():
    description = describe_machine()
    assert description["jax_backend"] is None  # a load generator must not grab the server's GPU
    assert description["threads"] >= 1 and description["cpu_model"]


def test_bench_engine_runs_end_to_end_on_a_tiny_workload(tmp_path):
    """pp/tg benchmark, our row only, tiny lengths: the JSON has the workload, the machine and a
    row with positive rates (figures not asserted)."""
    import subprocess
    import sys

    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_engine", "--pp", "16", "--tg", "4", "--reps", "1",
                           "--engines", "ours", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.glob("bench_engine-*.json")
    result = json.loads(result_file.read_text())
    assert result["machine"]["cpu_model"] and result["machine"]["jax_backend"]
    (row,) = [r for r in result["rows"] if r["engine"] == "mistralrs-jax"]
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert "mistralrs-jax" in proc.stdout
