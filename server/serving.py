"""Running the app under hypercorn: in the foreground until a signal (`mistralrs-server`),
or on a background thread (tests, the dashboard, benchmarks).

The listening socket is bound before hypercorn starts, so "listening on ..." is printed
only once connections are really accepted (they queue in the backlog until hypercorn
takes them), a busy port fails with a clear message, and port 0 picks a free port.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from mistralrs_jax.errors import MistralRsError

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3.0
# The kernel's send buffer per connection (inherited from the listening socket). Autotuned it
# grows to megabytes, and a client that stops reading would hold its sequence until that much
# output was buffered; bounded, the stream write timeout (limits.py) notices such a client soon.
SEND_BUFFER_BYTES = 64 * 1024


class ServerStartError(MistralRsError):
    """The HTTP server cannot start (e.g. the port is taken)."""


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                               "(or --host), or stop the program using it") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _config(sock: socket.socket) -> Config:
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn takes the already-listening socket over
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.accesslog = None
    # A Logger (not hypercorn's default "-") leaves output to the app's logging setup, so
    # lines are not printed twice (hypercorn's own handler plus propagation to the root).
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_socket(app: Any, sock: socket.socket, stop: asyncio.Event) -> None:
    await hypercorn_serve(app, _config(sock), shutdown_trigger=stop.wait)


def run_until_signal(app: Any, host: str, port: int, model_name: str = "",
                     shutdown_timeout: float = 30.0) -> None:
    """Serve on host:port in this thread until SIGINT or SIGTERM, then shut down gracefully:
    new requests get a 503 and the ones in flight get `shutdown_timeout` seconds to finish
    before they are aborted (`limits.Admission.drain`). A second signal aborts at once."""
    sock = bind_socket(host, port)
    url = socket_url(sock)

    async def main() -> None:
        stop, signalled = asyncio.Event(), asyncio.Event()
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (hurry if signalled.is_set() else signalled).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        server = asyncio.create_task(serve_socket(app, sock, stop))
        print(f"mistralrs-jax: serving {model_name} on {url} (OpenAI API at {url}/v1; Ctrl-C stops)", flush=True)
        waiter = asyncio.create_task(signalled.wait())
        await asyncio.wait([server, waiter], return_when=asyncio.FIRST_COMPLETED)
        if signalled.is_set() and not server.done():
            await drain_app(app, shutdown_timeout, hurry)
        stop.set()
        waiter.cancel()
        await server

    asyncio.run(main())


async def drain_app(app: Any, timeout: float, hurry: asyncio.Event | None = None) -> None:
    """Drain `app`'s admission (see limits.Admission.drain); `hurry` set cuts the wait short."""
    admission = getattr(app, "extensions", {}).get("mistralrs_admission")
    if admission is None:
        return
    log.info("shutting down: draining requests in flight (up to %.0f s)", timeout)
    print(f"mistralrs-jax: shutting down, letting {admission.in_flight} requests finish "
          f"(up to {timeout:.0f} s; signal again to abort them now)", flush=True)
    drain = asyncio.create_task(admission.drain(timeout))
    if hurry is not None:
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait([drain, hurried], return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not drain.done():
            drain.cancel()
            admission.abort_all()
            await asyncio.sleep(0.2)
            return
    finished = await drain
    log.info("drained: %s", "every request finished" if finished else "the rest were aborted")


class BackgroundServer:
    """The app on a daemon thread with its own event loop: `with BackgroundServer(app) as server: server.url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self._sock = bind_socket(host, port)
        self.url = socket_url(self._sock)
        self.port = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mistralrs-http", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await serve_socket(self.app, self._sock, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by stop(); a daemon thread has nobody else to tell
            self.error = exc
            log.exception("the background HTTP server failed")
        finally:
            self._ready.set()

    def start(self) -> "BackgroundServer":
        self._thread.start()
        self._ready.wait(timeout=30)
        return self

    def drain(self, timeout: float) -> bool:
        """Drain the app as a shutdown signal does (limits.Admission.drain), from any thread:
        True if every request in flight finished within `timeout` seconds."""
        admission = self.app.extensions["mistralrs_admission"]
        return asyncio.run_coroutine_threadsafe(admission.drain(timeout), self._loop).result()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
