"""Graceful shutdown of a real `mistralrs-server` process (default model) on SIGTERM / SIGINT:
new requests get 503, /health says "draining", requests in flight finish within
--shutdown-timeout, the rest are aborted (blocks freed), and the process exits 0."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["server_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_TIMEOUT_S = 8
BODY_LIMIT = 2000


def _start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mistralrs_jax.cli", "--port", "0", "--max-seqs", "4", "--max-num-batched-tokens", "32",
         "--pa-ctxt-len", "2048", "--seed", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in process.stdout:
        found = re.search(r"serving .* on (http://\S+) ", line)
        if found:
            return process, found.group(1)
    process.wait()
    raise AssertionError("the server did not start: " + process.stderr.read()[-3000:])


class _Stream(threading.Thread):
    """A streamed chat completion read to its end on a thread: its finish reasons and whether [DONE] came."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.started = threading.Event()
        self.finish_reasons: list[str] = []
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=300) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        for choice in chunk.get("choices", []):
                            if choice["delta"].get("content"):
                                self.started.set()
                            if choice.get("finish_reason"):
                                self.finish_reasons.append(choice["finish_reason"])
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_requests_then_exits_zero(smollm2_gguf_path, signum):
    # --max-seqs 2 --max-waiting 0: the two streams below fill the server, so a third request is refused.
    process, url = _start_server("--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--max-body-bytes", str(BODY_LIMIT),
                                 "--max-seqs", "2", "--max-waiting", "0")
    try:
        too_big = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * BODY_LIMIT, "max_tokens": 1}, timeout=60)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        short, long = _Stream(url, max_tokens=30), _Stream(url, max_tokens=1500)
        short.start()
        long.start()
        assert short.started.wait(120) and long.started.wait(120), (short.error, long.error)
        full = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 2}, timeout=10)
        assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
        assert full.json()["error"]["code"] == "server_overloaded" and "--max-waiting 0" in full.text
        signalled = time.monotonic()
        process.send_signal(signum)
        health = None
        while time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S / 2:
            health = httpx.get(f"{url}/health", timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health is not None and health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "server_shutting_down"
        short.join(120)
        long.join(SHUTDOWN_TIMEOUT_S + 60)
        assert short.error is None and long.error is None, (short.error, long.error)
        # The short request finished within the timeout; the long one was aborted at it.
        assert short.finish_reasons == ["length"] and short.done
        assert long.finish_reasons == ["abort"] and long.done
        assert time.monotonic() - signalled >= SHUTDOWN_TIMEOUT_S - 1
        returncode = process.wait(timeout=60)
        stderr = process.stderr.read()
        assert returncode == 0, stderr[-3000:]
        assert "aborting 1 requests still in flight" in stderr
        assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S + 30
    finally:
        _stop(process)


@pytest.mark.slow
def test_sigint_with_nothing_in_flight_exits_at_once(smollm2_gguf_path):
    process, url = _start_server("--shutdown-timeout", "600")
    try:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, process.stderr.read()[-3000:]
        assert time.monotonic() - signalled < 30  # nothing to wait for: no 600 s drain
    finally:
        _stop(process)


def test_drain_aborts_the_rest_and_frees_their_blocks(server_llm):
    """In process: drain() with a short timeout aborts a long request; its KV blocks come back."""
    from server.app import create_app
    from server.serving import BackgroundServer

    app = create_app(server_llm)
    admission = app.extensions["mistralrs_admission"]
    with BackgroundServer(app) as background:
        stream = _Stream(background.url, max_tokens=1500)
        stream.start()
        assert stream.started.wait(120), stream.error
        assert admission.in_flight == 1
        assert background.drain(0.5) is False  # it had to abort
        stream.join(60)
        assert stream.finish_reasons == ["abort"] and stream.done, stream.error
        deadline = time.monotonic() + 30
        while (metrics := server_llm.engine.stats())["kv_blocks_used"] or metrics["requests"]:
            assert time.monotonic() < deadline, "the aborted request's blocks were not freed"
            time.sleep(0.05)
        assert httpx.get(f"{background.url}/health", timeout=10).json()["status"] == "draining"
