"""`--request-logging-file`: one JSON line per request/response exchange.

An `Exchange` is opened when a request arrives, filled by its route (parameters, token
counts, the answer) and written once when the response is done: at once for a plain
response, when the last chunk is sent (or the client leaves) for a stream.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Exchange:
    method: str
    route: str
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    request_id: str | None = None
    params: Any = None  # the request body as the client sent it
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reasons: list[str | None] | None = None
    response: list[str] | None = None  # the generated texts, one per choice
    status: int | None = None
    error: str | None = None
    deferred: bool = False  # a stream: written when the stream ends, not with the headers
    written: bool = False

    def end_stream(self, request_log: "RequestLog | None", completion_tokens: int,
                   finish_reasons: list[str | None], texts: list[str]) -> None:
        """Close a streamed exchange (the headers went out long ago) and log it."""
        if self.status is None:
            self.status = 499  # nginx's "client closed request": the client left mid-stream
            self.error = "the client disconnected before the stream ended; its request was aborted"
        self.completion_tokens = completion_tokens
        self.finish_reasons = finish_reasons
        self.response = texts
        if request_log is not None:
            request_log.write(self)

    def record(self) -> dict[str, Any]:
        return {
            "timestamp": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(),
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "latency_s": round(time.monotonic() - self.started_monotonic, 6),
            "request_id": self.request_id,
            "stream": self.stream,
            "params": self.params,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reasons": self.finish_reasons,
            "response": self.response,
            "error": self.error,
        }


class RequestLog:
    """Appends exchanges to a file, one JSON object per line; safe from any thread."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        # An unbuffered append descriptor: each record goes out in one write() call, so a reader
        # tailing the file never sees half a line (a buffered text file flushes long lines in parts).
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, exchange: Exchange) -> None:
        if exchange.written:
            return
        exchange.written = True
        line = json.dumps(exchange.record(), ensure_ascii=False, default=str)
        try:
            data = (line + "\n").encode("utf-8")
            with self._lock:
                while data:
                    data = data[os.write(self._fd, data):]
        except OSError as exc:  # a full disk must not take the API down
            log.warning("could not write to the request log %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
