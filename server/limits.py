"""Admission control in front of the app (an ASGI wrapper): a bounded queue, draining, and a
write timeout for streams.

- Overload: at most `max_seqs + max_waiting` generation requests are in flight (the engine
  runs `max_seqs` at once, so at most `max_waiting` wait). One more is answered at once with
  a 503, `Retry-After` and an OpenAI error body, never queued without bound.
- Draining (graceful shutdown, `drain()`): new generation requests get a 503, `/health`
  answers 503 `{"status": "draining"}`, the requests in flight may finish until the deadline,
  then the rest are aborted (which frees their KV blocks).
- A client that stops reading a stream cannot hold its sequence: a body write that does not
  complete within `write_timeout` seconds ends the response, and ending it aborts the request.
- A client that has gone away cannot hold its sequence either. The server normally learns of it
  by cancelling the request's task, but Python 3.11's `asyncio.wait_for` (Quart wraps each
  response in one) loses a cancellation that lands as the awaited write completes, and the
  body generator then streams on into a closed socket. So the wrapper also watches the ASGI
  `http.disconnect` message itself, and any body write after it ends the response.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

DEFAULT_MAX_WAITING = 256
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_WRITE_TIMEOUT_S = 30.0
OVERLOAD_RETRY_AFTER_S = 1
DRAIN_RETRY_AFTER_S = 5
ABORT_GRACE_S = 5.0  # after aborting at the deadline, how long the aborted responses get to end

# The routes that queue work on the engine.
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ResponseEnded(TimeoutError):
    """Raised from a response body write to end the response early. A TimeoutError because Quart
    ends a response quietly on one: it closes the body generator, whose `finally` aborts the
    request (the routes' `abort_unfinished`), which frees its KV blocks."""


class StreamWriteTimeout(ResponseEnded):
    """The client did not take a response chunk in time (it stopped reading)."""


class ClientDisconnected(ResponseEnded):
    """The client closed its connection (ASGI `http.disconnect`) while the response streamed."""


def _watching(receive: Callable[[], Awaitable[dict[str, Any]]],
              gone: asyncio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """`receive`, setting `gone` when the server reports that the client disconnected."""

    async def watched() -> dict[str, Any]:
        message = await receive()
        if message.get("type") == "http.disconnect":
            gone.set()
        return message

    return watched


class Admission:
    """ASGI middleware: `app.asgi_app = Admission(app.asgi_app, state, max_waiting=...)`."""

    def __init__(self, asgi_app: Any, state: Any, *, max_waiting: int = DEFAULT_MAX_WAITING,
                 write_timeout: float | None = DEFAULT_WRITE_TIMEOUT_S):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.asgi_app = asgi_app
        self.state = state
        self.max_waiting = max_waiting
        self.write_timeout = write_timeout
        self.in_flight = 0
        self.rejected = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    @property
    def capacity(self) -> int:
        """Generation requests admitted at once: the engine's running slots plus the waiting queue."""
        return self.state.engine.limits.max_seqs + self.max_waiting

    async def __call__(self, scope: Scope, receive: Callable, send: Send) -> None:
        if scope["type"] != "http":
            return await self.asgi_app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        if self.draining and path == "/health" and method == "GET":
            return await _reply(send, 503, {"status": "draining", "model": self.state.model_name,
                                            "detail": "the server is shutting down"})
        if path not in GENERATION_ROUTES or method != "POST":
            return await self.asgi_app(scope, receive, send)
        if self.draining:
            return await self._refuse(send, path, "the server is shutting down and takes no new requests; "
                                                  "retry on another instance", "server_shutting_down",
                                      DRAIN_RETRY_AFTER_S)
        if self.in_flight >= self.capacity:
            self.rejected += 1
            await _discard_body(receive)
            return await self._refuse(send, path, f"the server is overloaded: {self.in_flight} requests are in "
                                                  f"flight, the most it queues (--max-waiting {self.max_waiting} "
                                                  "beyond --max-seqs); retry later", "server_overloaded",
                                      OVERLOAD_RETRY_AFTER_S)
        self.in_flight += 1
        try:
            gone = asyncio.Event()
            await self.asgi_app(scope, _watching(receive, gone), self._guarded(send, gone))
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    def _guarded(self, send: Send, gone: asyncio.Event) -> Send:
        """`send`, except that a body write after the client left raises ClientDisconnected and
        one that the client does not take within `write_timeout` s raises StreamWriteTimeout."""
        timeout = self.write_timeout

        async def guarded_send(message: dict[str, Any]) -> None:
            if message.get("type") != "http.response.body":
                return await send(message)
            if gone.is_set():
                raise ClientDisconnected("the client closed its connection")
            if not timeout:
                return await send(message)
            try:
                # asyncio.timeout, not wait_for: a cancellation that arrives as the write ends
                # must still cancel (see the module docstring).
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                log.warning("a client took no response data for %.0f s: ending its response and aborting "
                            "its request", timeout)
                raise StreamWriteTimeout(f"the client took no data for {timeout} s") from None

        return guarded_send

    async def _refuse(self, send: Send, path: str, message: str, code: str, retry_after: int) -> None:
        self.state.count_response(path, 503)
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        await _reply(send, 503, body, {"retry-after": str(retry_after)})

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, wait up to `timeout` s for the requests in flight, then abort the rest.
        True if everything finished by itself."""
        self.draining = True
        self._idle = asyncio.Event()
        if self.in_flight == 0:
            return True
        log.info("draining: %d requests in flight, waiting up to %.0f s", self.in_flight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            pass
        deadline = time.monotonic() + ABORT_GRACE_S
        log.warning("shutdown timeout (%.0f s): aborting %d requests still in flight", timeout, self.in_flight)
        while self.in_flight and time.monotonic() < deadline:
            self.abort_all()
            try:
                await asyncio.wait_for(self._idle.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        return False

    def abort_all(self) -> int:
        """Abort every request the engine holds (waiting or running); the number of requests."""
        engine = self.state.engine
        ids = {row["request_id"] for row in engine.stats().get("requests", ())}
        for request_id in ids:
            engine.abort(request_id)
        return len(ids)


async def _discard_body(receive: Callable, limit: int = 16 << 20, timeout: float = 5.0) -> None:
    """Read and drop a refused request's body (up to `limit` bytes, `timeout` s), so the keep-alive
    connection survives the 503 and the client's retry can use it."""
    seen = 0
    try:
        async with asyncio.timeout(timeout):
            while seen <= limit:
                message = await receive()
                seen += len(message.get("body", b""))
                if message.get("type") != "http.request" or not message.get("more_body"):
                    return
    except TimeoutError:
        return


async def _reply(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           (b"access-control-allow-origin", b"*")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})
