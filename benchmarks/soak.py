"""Soak: mixed traffic against a server for a bounded time, looking for leaks and 5xx.

    python -m benchmarks.soak --duration 600                # starts a server (default model), 10 minutes
    python -m benchmarks.soak --url http://127.0.0.1:1234 --duration 120 --concurrency 32

`--concurrency` clients loop until `--duration` seconds have passed (after `--warmup`
seconds of the same traffic, which compiles what the mix needs and is not judged). Each
request is drawn (seeded) from a mix: chat and text completions, whole and streamed, n=2,
stop strings, output constrained by a JSON schema (response_format), and clients that
go away: a stream dropped after a few chunks, a request abandoned before its answer.

Reported (printed, and written as JSON with `--report`): requests per kind and status,
5xx count, KV blocks still in use once the server is idle (must be 0: anything else is a
leak), the server's RSS (from /v1/status) at the end of warm-up and at the end, with the
growth, and p50/p99 latency of the completed requests per time window.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger(__name__)

WORDS = ("river mountain copper violet engine lantern harbor meadow falcon cedar granite thunder orchard "
         "silver canyon ember glacier willow comet saffron").split()
COLOUR_SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                                  "count": {"type": "integer"}},
                 "required": ["colour", "count"], "additionalProperties": False}
KINDS = ("chat", "chat_stream", "completion", "completion_stream_n2", "stop_strings", "json_schema",
         "disconnect_stream", "abandon")
SERVER_FLAGS = ("--max-seqs", "32", "--max-num-batched-tokens", "128", "--pa-ctxt-len", "4096", "--seed", "0")


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    status: int | None  # None: the client went away on purpose (or the connection failed)
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.kind not in ("disconnect_stream", "abandon")


@dataclass
class Soak:
    url: str
    concurrency: int = 32
    seed: int = 0
    max_tokens: int = 24
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int | None]] = field(default_factory=list)

    def _prompt(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))

    def _request(self, kind: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
        max_tokens = rng.randint(1, self.max_tokens)
        chat = {"model": "default", "messages": [{"role": "user", "content": self._prompt(rng)}],
                "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.7, 1.0])}
        completion = {"model": "default", "prompt": self._prompt(rng), "max_tokens": max_tokens}
        if kind == "chat":
            return "/v1/chat/completions", chat
        if kind in ("chat_stream", "disconnect_stream"):
            return "/v1/chat/completions", {**chat, "stream": True, "max_tokens": self.max_tokens * 2}
        if kind == "completion":
            return "/v1/completions", completion
        if kind == "completion_stream_n2":
            return "/v1/completions", {**completion, "n": 2, "stream": True, "temperature": 0.8}
        if kind == "stop_strings":
            return "/v1/chat/completions", {**chat, "stop": [" the", ".", "\n"], "max_tokens": self.max_tokens}
        if kind == "json_schema":
            return "/v1/chat/completions", {**chat, "max_tokens": 40, "response_format": {
                "type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA}}}
        return "/v1/chat/completions", {**chat, "max_tokens": self.max_tokens * 2}  # abandon

    async def _one(self, client: httpx.AsyncClient, rng: random.Random) -> Outcome:
        kind = rng.choice(KINDS)
        path, body = self._request(kind, rng)
        start = time.monotonic()
        try:
            if kind == "abandon":  # the client gives up before the answer: the server must abort it
                try:
                    await asyncio.wait_for(client.post(path, json=body), rng.uniform(0.01, 1.0))
                except asyncio.TimeoutError:
                    return Outcome(kind, start, time.monotonic(), None)
                return Outcome(kind, start, time.monotonic(), 200)
            if body.get("stream"):
                async with client.stream("POST", path, json=body) as response:
                    chunks = 0
                    drop_after = rng.randint(1, 4) if kind == "disconnect_stream" else None
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks += 1
                            if '"error"' in line[:12]:
                                return Outcome(kind, start, time.monotonic(), 500, line[:300])
                        if drop_after is not None and chunks >= drop_after:
                            break  # leaving the block closes the connection mid-stream
                    return Outcome(kind, start, time.monotonic(), response.status_code)
            response = await client.post(path, json=body)
            error = None
            if response.status_code == 200 and kind == "json_schema":
                choice = response.json()["choices"][0]
                if choice["finish_reason"] == "stop":  # complete (not cut by max_tokens): valid JSON
                    json.loads(choice["message"]["content"])
            elif response.status_code != 200:
                error = response.text[:300]
            return Outcome(kind, start, time.monotonic(), response.status_code, error)
        except (httpx.HTTPError, ValueError) as exc:
            return Outcome(kind, start, time.monotonic(), None, f"{type(exc).__name__}: {exc}")

    async def _client(self, index: int, until: float, sink: list[Outcome]) -> None:
        rng = random.Random(self.seed * 1000 + index)
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as client:
            while time.monotonic() < until:
                sink.append(await self._one(client, rng))

    async def _sample_rss(self, until: float, every: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            while time.monotonic() < until:
                self.rss.append((time.monotonic(), await _rss(client)))
                await asyncio.sleep(every)

    async def run(self, duration: float, warmup: float) -> dict[str, Any]:
        warm: list[Outcome] = []
        if warmup > 0:
            until = time.monotonic() + warmup
            await asyncio.gather(*(self._client(i, until, warm) for i in range(self.concurrency)))
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            await _wait_idle(client)
            rss_start = await _rss(client)
        start = time.monotonic()
        until = start + duration
        await asyncio.gather(self._sample_rss(until, max(1.0, duration / 60)),
                             *(self._client(1000 + i, until, self.outcomes) for i in range(self.concurrency)))
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            idle = await _wait_idle(client)
            rss_end = await _rss(client)
        return self._report(start, duration, warmup, warm, rss_start, rss_end, idle)

    def _report(self, start: float, duration: float, warmup: float, warm: list[Outcome], rss_start: int | None,
                rss_end: int | None, idle: dict[str, Any]) -> dict[str, Any]:
        statuses = Counter(str(o.status) for o in self.outcomes)
        windows = max(1, min(10, int(duration // 10)))
        width = duration / windows
        latency = []
        for w in range(windows):
            done = sorted(o.end - o.start for o in self.outcomes
                          if o.completed and start + w * width <= o.end < start + (w + 1) * width)
            latency.append({"window_start_s": round(w * width, 1), "completed": len(done),
                            "p50_s": _percentile(done, 50), "p99_s": _percentile(done, 99)})
        growth = (rss_end - rss_start) / rss_start if rss_start and rss_end else None
        return {
            "url": self.url, "duration_s": duration, "warmup_s": warmup, "concurrency": self.concurrency,
            "seed": self.seed, "warmup_requests": len(warm),
            "requests": len(self.outcomes), "completed": sum(o.completed for o in self.outcomes),
            "by_kind": dict(Counter(o.kind for o in self.outcomes)), "statuses": dict(statuses),
            "server_errors_5xx": sum(1 for o in self.outcomes + warm if o.status is not None and o.status >= 500),
            "client_errors": [o.error for o in self.outcomes if o.error][:10],
            "leaked_kv_blocks": idle.get("kv_blocks_used"), "requests_left_in_engine": len(idle.get("requests", [])),
            "rss_start_bytes": rss_start, "rss_end_bytes": rss_end, "rss_growth": growth,
            "rss_samples": [(round(t - start, 1), r) for t, r in self.rss],
            "latency_windows": latency,
        }


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, int(round(pct / 100 * len(values) + 0.5)) - 1))
    return round(values[index], 4)


async def _status(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/status")
    response.raise_for_status()
    return response.json()


async def _rss(client: httpx.AsyncClient) -> int | None:
    return (await _status(client)).get("memory", {}).get("rss_bytes")


async def _wait_idle(client: httpx.AsyncClient, timeout: float = 120.0) -> dict[str, Any]:
    """The engine's metrics once it holds no request (aborts settle within a step)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = (await _status(client))["metrics"]
        if not metrics.get("requests") and not metrics.get("num_waiting") and not metrics.get("num_running"):
            return metrics
        if time.monotonic() > deadline:
            log.warning("the engine is not idle after %.0f s: %s", timeout, metrics.get("requests"))
            return metrics
        await asyncio.sleep(0.1)


def start_server(flags: tuple[str, ...] = SERVER_FLAGS, timeout: float = 900) -> tuple[subprocess.Popen, str]:
    """A `mistralrs-server` process on a free port (the default model); (process, url)."""
    process = subprocess.Popen([sys.executable, "-m", "mistralrs_jax.cli", "--port", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        found = re.search(r"serving .* on (http://\S+) ", line)
        if found:
            return process, found.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("the server did not start (run `mistralrs-server` by hand to see why)")


def stop_server(process: subprocess.Popen) -> int:
    process.terminate()
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run(url: str | None = None, duration: float = 600, warmup: float = 60, concurrency: int = 32,
        seed: int = 0, max_tokens: int = 24) -> dict[str, Any]:
    """One soak run; starts (and stops) a server when `url` is None."""
    process = None
    if url is None:
        process, url = start_server()
    try:
        report = asyncio.run(Soak(url, concurrency, seed, max_tokens).run(duration, warmup))
    finally:
        if process is not None:
            report_exit = stop_server(process)
            log.info("the server exited with %s", report_exit)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one with the default model)")
    parser.add_argument("--duration", type=float, default=600, help="seconds of judged traffic (default 600)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of unjudged traffic first (default 60)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=24, help="upper bound of the drawn max_tokens")
    parser.add_argument("--report", help="write the report here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    report = run(args.url, args.duration, args.warmup, args.concurrency, args.seed, args.max_tokens)
    summary = {k: v for k, v in report.items() if k != "rss_samples"}
    print(json.dumps(summary, indent=1))
    if args.report:
        with open(args.report, "w") as handle:
            json.dump(report, handle, indent=1)
    ok = report["server_errors_5xx"] == 0 and report["leaked_kv_blocks"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
