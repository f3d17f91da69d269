"""The admission wrapper (server/limits.py) ends a response whose client is gone, even when the
cancellation that should have ended it is lost.

Python 3.11's `asyncio.wait_for` returns normally when a cancellation lands just as the awaited
operation completes. Quart wraps each response in one, and our write timeout used to wrap each
body write in another: CI once saw a killed client's stream run on for 5 s into a closed socket
(`socket.send() raised exception`, its KV blocks held). These tests drive the wrapper's send and
receive directly, on the exact interleavings that lose a cancellation.
"""
from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import pytest
from peers import not_applicable

from server.limits import Admission, ClientDisconnected, ResponseEnded, StreamWriteTimeout

BODY = {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}


def _admission(write_timeout: float | None = 30.0) -> Admission:
    state = SimpleNamespace(engine=SimpleNamespace(limits=SimpleNamespace(max_seqs=4)))
    return Admission(None, state, write_timeout=write_timeout)


def _cancel_as_the_first_write_completes(make_write) -> tuple[int, bool]:
    """Stream 50 body writes through `make_write(socket_send)`; cancel the streaming task in the
    very loop iteration in which its first write completes. (writes done, cancelled?)"""

    async def main() -> tuple[int, bool]:
        in_write = asyncio.Event()

        async def socket_send(message: dict) -> None:
            in_write.set()
            await asyncio.sleep(0)

        write = make_write(socket_send)
        sent = 0

        async def stream() -> None:
            nonlocal sent
            for _ in range(50):
                await write(BODY)
                sent += 1

        task = asyncio.create_task(stream())
        await in_write.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return sent, True
        return sent, False

    return asyncio.run(main())


@pytest.mark.parametrize("write_timeout", [30.0, None])
def test_a_cancellation_landing_as_a_write_completes_still_cancels(write_timeout):
    sent, cancelled = _cancel_as_the_first_write_completes(
        lambda socket_send: _admission(write_timeout)._guarded(socket_send, asyncio.Event()))
    assert cancelled and sent == 0, (sent, cancelled)


def test_the_old_wait_for_write_lost_that_cancellation():
    """The same interleaving through asyncio.wait_for: the cancellation is swallowed and the stream
    runs to its end. This pins the hazard the wrapper guards against (Python 3.11)."""
    if sys.version_info >= (3, 12):
        not_applicable("Python 3.12 rewrote asyncio.wait_for on asyncio.timeout; the hazard is 3.11's")
    sent, cancelled = _cancel_as_the_first_write_completes(
        lambda socket_send: lambda message: asyncio.wait_for(socket_send(message), 30.0))
    assert (sent, cancelled) == (50, False)


def test_a_body_write_after_the_disconnect_message_ends_the_response():
    """Whatever happened to the cancellation, once the server has said `http.disconnect` the next
    body write raises, so the body generator is closed (and its request aborted)."""

    async def main() -> tuple[int, BaseException | None, list]:
        admission = _admission()
        messages = asyncio.Queue()
        await messages.put({"type": "http.request", "body": b"{}", "more_body": False})
        written: list[dict] = []
        sent = 0
        ended: BaseException | None = None

        async def receive() -> dict:
            return await messages.get()

        async def socket_send(message: dict) -> None:
            written.append(message)

        async def app(scope, receive, send) -> None:
            nonlocal sent, ended
            assert (await receive())["type"] == "http.request"
            await send({"type": "http.response.start", "status": 200, "headers": []})
            try:
                for _ in range(50):
                    await send(BODY)
                    sent += 1
                    if sent == 3:
                        await messages.put({"type": "http.disconnect"})
                        assert (await receive())["type"] == "http.disconnect"
            except ResponseEnded as exc:
                ended = exc

        admission.asgi_app = app
        await admission({"type": "http", "path": "/v1/completions", "method": "POST"}, receive, socket_send)
        assert admission.in_flight == 0
        return sent, ended, written

    sent, ended, written = asyncio.run(main())
    assert sent == 3 and isinstance(ended, ClientDisconnected), (sent, ended)
    assert isinstance(ended, TimeoutError)  # Quart ends a response quietly on a TimeoutError
    assert [m["type"] for m in written] == ["http.response.start"] + ["http.response.body"] * 3


def test_a_write_the_client_does_not_take_times_out():
    async def main() -> BaseException | None:
        async def stuck_send(message: dict) -> None:
            await asyncio.sleep(3600)

        send = _admission(write_timeout=0.05)._guarded(stuck_send, asyncio.Event())
        try:
            await send(BODY)
        except StreamWriteTimeout as exc:
            return exc
        return None

    assert isinstance(asyncio.run(main()), StreamWriteTimeout)
