"""PNG figures of benchmark results (matplotlib, drawn off-screen).

The machine description goes into each figure twice: as a footer line people read, and
as PNG text metadata (`Description`) tools read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .machine import one_line

LATENCY_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"))


def _level_labels(levels: list[dict[str, Any]]) -> tuple[list[str], str]:
    kinds = {level["kind"] for level in levels}
    labels = []
    for level in levels:
        value = level["value"]
        if level["kind"] == "concurrency":
            labels.append(str(value) if kinds == {"concurrency"} else f"c={value}")
        else:
            text = "inf" if math.isinf(value) else f"{value:g}"
            labels.append(text if kinds == {"rate"} else f"{text}/s")
    axis = {frozenset({"concurrency"}): "concurrency (requests in flight)",
            frozenset({"rate"}): "request rate (Poisson, requests/s)"}.get(frozenset(kinds), "level")
    return labels, axis


def plot_serving(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels per sweep: output tok/s and req/s per level; TTFT/TPOT/ITL median and p99 per level."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none wanted
    import matplotlib.pyplot as plt

    levels = result["levels"]
    labels, axis_label = _level_labels(levels)
    positions = list(range(len(levels)))
    figure, (throughput_ax, latency_ax) = plt.subplots(1, 2, figsize=(12, 4.8))

    output = [level["summary"]["output_throughput"] for level in levels]
    requests = [level["summary"]["request_throughput"] for level in levels]
    throughput_ax.plot(positions, output, marker="o", color="tab:blue", label="output tok/s")
    throughput_ax.set_ylabel("output tokens / s", color="tab:blue")
    throughput_ax.set_ylim(bottom=0)
    request_ax = throughput_ax.twinx()
    request_ax.plot(positions, requests, marker="s", linestyle="--", color="tab:orange", label="requests/s")
    request_ax.set_ylabel("requests / s", color="tab:orange")
    request_ax.set_ylim(bottom=0)
    throughput_ax.set_title("throughput")

    colors = {"TTFT": "tab:red", "TPOT": "tab:green", "ITL": "tab:purple"}
    for key, name in LATENCY_METRICS:
        medians = [_ms(level["summary"][key]["median"]) for level in levels]
        p99s = [_ms(level["summary"][key]["p99"]) for level in levels]
        latency_ax.plot(positions, medians, marker="o", color=colors[name], label=f"{name} median")
        latency_ax.plot(positions, p99s, marker="^", linestyle=":", color=colors[name], label=f"{name} p99")
    latency_ax.set_ylabel("milliseconds")
    latency_ax.set_yscale("log")
    latency_ax.set_title("latency percentiles")
    latency_ax.legend(fontsize="small", ncol=3)

    for ax in (throughput_ax, latency_ax):
        ax.set_xticks(positions, labels)
        ax.set_xlabel(axis_label)
        ax.grid(alpha=0.3)

    server = result.get("server", {})
    machine = one_line(result.get("machine", {}))
    settings = result.get("settings", {})
    figure.suptitle(f"{server.get('model', '?')} at {server.get('url', '?')} — {settings.get('num_requests')} "
                    f"requests/level, max_tokens {settings.get('max_tokens')}")
    figure.text(0.01, 0.01, machine, fontsize="small", color="dimgray")
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    path = Path(path)
    figure.savefig(path, dpi=110, metadata={"Description": json.dumps(result.get("machine", {})),
                                             "Title": f"serving benchmark {result.get('time', '')}"})
    plt.close(figure)
    return path


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000.0
