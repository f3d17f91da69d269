"""Overload on the real server (default model, loopback): a full queue answers 503 with
Retry-After at once; a client that stops reading a stream loses its sequence after the
write timeout; an image that declares too many pixels is refused before it is decoded."""
from __future__ import annotations

import json
import socket
import struct
import time
import tracemalloc
import zlib
from contextlib import ExitStack

import httpx
import openai
import pytest

from mistralrs_jax.errors import ImageError

pytest_plugins = ["server_fixtures"]

LONG_STREAM = {"model": "default", "messages": [{"role": "user", "content": "Count to a thousand."}],
               "max_tokens": 3500, "ignore_eos": True, "stream": True, "temperature": 0}
SHORT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
WRITE_TIMEOUT_S = 1.0


def _serve(llm, **kwargs):
    from server.app import create_app
    from server.serving import BackgroundServer

    return BackgroundServer(create_app(llm, **kwargs)).start()


@pytest.fixture(scope="module")
def tight_url(server_llm):
    """The shared engine behind an app that queues nothing beyond the engine's max_seqs."""
    background = _serve(server_llm, max_waiting=0)
    try:
        yield background.url
    finally:
        background.stop()


@pytest.fixture(scope="module")
def impatient_url(server_llm):
    background = _serve(server_llm, stream_write_timeout=WRITE_TIMEOUT_S)
    try:
        yield background.url
    finally:
        background.stop()


def _status(url: str) -> dict:
    return httpx.get(f"{url}/v1/status", timeout=30).json()["metrics"]


def _wait_idle(url: str, timeout: float = 120.0) -> dict:
    """Wait until the engine holds no request and no KV block; the last metrics snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = _status(url)
        if not metrics["requests"] and metrics["kv_blocks_used"] == 0:
            return metrics
        assert time.monotonic() < deadline, f"the engine did not go idle: {metrics['requests']}, " \
                                            f"{metrics['kv_blocks_used']} KV blocks used"
        time.sleep(0.1)


def test_a_full_queue_answers_503_with_retry_after_at_once(tight_url, server_llm):
    capacity = server_llm.engine.limits.max_seqs  # --max-waiting 0: nothing waits beyond the running slots
    _wait_idle(tight_url)
    with ExitStack() as stack:
        client = stack.enter_context(httpx.Client(base_url=tight_url, timeout=120))
        lines = []  # kept: dropping an httpx line iterator closes its response
        for _ in range(capacity):
            response = stack.enter_context(client.stream("POST", "/v1/chat/completions", json=LONG_STREAM))
            assert response.status_code == 200
            lines.append(response.iter_lines())
            assert next(lines[-1]).startswith("data: ")  # generation has begun
        start = time.monotonic()
        refused = client.post("/v1/chat/completions", json=SHORT)
        waited = time.monotonic() - start
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "server_overloaded" and error["type"] == "server_error"
        assert "--max-waiting" in error["message"]
        assert waited < 10, f"the refusal took {waited:.1f} s: it must not wait for room"
        # The openai client sees the same refusal as a typed error (no retries here).
        with pytest.raises(openai.InternalServerError) as caught:
            openai.OpenAI(base_url=f"{tight_url}/v1", api_key="none", max_retries=0).chat.completions.create(
                **SHORT)
        assert caught.value.status_code == 503
        assert json.loads(caught.value.response.text)["error"]["code"] == "server_overloaded"
        # Other routes still answer while the queue is full.
        assert client.get("/health").status_code == 200
    # The streams were closed by the client: their sequences are aborted and every block is free.
    _wait_idle(tight_url)
    answer = httpx.post(f"{tight_url}/v1/chat/completions", json=SHORT, timeout=120)
    assert answer.status_code == 200, answer.text


def test_a_client_that_stops_reading_loses_its_sequence(impatient_url):
    before = _wait_idle(impatient_url)["requests_aborted"]
    host, port = impatient_url.removeprefix("http://").rsplit(":", 1)
    # Top-20 logprobs make each chunk ~3 KB, so the socket buffers fill within a few dozen tokens.
    body = json.dumps({**LONG_STREAM, "logprobs": True, "top_logprobs": 20}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a small window fills fast
    try:
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # Never read. The server's writes block once the socket buffers are full; after
        # WRITE_TIMEOUT_S it gives up, aborts the request and frees its blocks.
        deadline = time.monotonic() + 180
        while True:
            metrics = _status(impatient_url)
            if metrics["requests_aborted"] > before and not metrics["requests"]:
                break
            assert time.monotonic() < deadline, "the unread stream still holds its sequence"
            time.sleep(0.2)
        generated = metrics["generation_tokens_total"]
        assert metrics["kv_blocks_used"] == 0
        time.sleep(1)
        assert _status(impatient_url)["generation_tokens_total"] == generated  # nothing runs on for it
    finally:
        sock.close()
    answer = httpx.post(f"{impatient_url}/v1/chat/completions", json=SHORT, timeout=120)
    assert answer.status_code == 200, answer.text


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    from mistralrs_jax.models.vision.image_processing import MAX_IMAGE_PIXELS, load_image

    # 48 MP: over this server's limit, under PIL's own bomb guard (89 MP warns, 179 MP fails).
    bomb = _png_header_only(8000, 6000)
    assert 8000 * 6000 > MAX_IMAGE_PIXELS
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="declares 8000x6000 pixels"):
            load_image(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated: the image was decoded"  # decoded it would be 144 MB
    import base64

    # The data-URL path too; past 179 MP PIL's own guard answers first, still before decoding.
    with pytest.raises(ImageError, match="pixels"):
        load_image("data:image/png;base64," + base64.b64encode(_png_header_only(30000, 30000)).decode())
    small = load_image(_png_header_only(4, 4))  # a small image with the same (short) data decodes
    assert small.size == (4, 4)
