"""Chat templates rendered in a bounded worker process: a deadline, a memory cap, an output cap.

A chat template comes from the model file, so it is untrusted code. Jinja's sandbox stops it from
reaching Python's internals, but not from spending: `{% for i in range(99999) %}` nested twice,
`{{ 9**(9**9) }}` (which Jinja would even fold at compile time) or `{{ 'a' * 10**10 }}` run until
the machine gives out. So templates are only parsed in this process (to report syntax errors at
load), and compiled and rendered in a worker process:

- the worker's address space is capped (`resource.RLIMIT_AS`), so a huge allocation is a
  MemoryError there, not an out-of-memory kill here;
- `**`, `*` and `+` go through a check that refuses results past a size bound before computing
  them (Jinja's documented `intercepted_binops` hook, which also stops constant folding);
- output is counted as it is generated and stops at `MAX_OUTPUT_CHARS`;
- a render that does not answer within its deadline has its worker killed (and replaced on
  the next render).

Every failure is a `TemplateError`: rendering fails closed. The worker speaks JSON lines over its
stdin/stdout, so nothing it says is unpickled here. It builds its Jinja environment with the
factory named by `environment` ("module:function"), the same one the caller parses with.
"""
from __future__ import annotations

import importlib
import json
import logging
import selectors
import subprocess
import sys
import threading
import time
from typing import Any

from ..errors import TemplateError

log = logging.getLogger(__name__)

RENDER_TIMEOUT_S = 10.0  # one render, compile included
STARTUP_TIMEOUT_S = 60.0  # the worker's interpreter start (slow on a busy machine)
MEMORY_LIMIT_BYTES = 2 << 30  # the worker's address space
MAX_OUTPUT_CHARS = 8 << 20  # far past any context window's worth of prompt text
MAX_INT_BITS = 1 << 16  # integers a template may compute (65,536 bits: 19,729 digits)
MAX_PARSE_CHARS = 16 << 20  # template source


def check_syntax(environment, source: str, what: str) -> None:
    """Parse `source` (no compiling, so no constant folding) and raise a TemplateError for
    invalid Jinja or a template too large or too deeply nested to parse."""
    import jinja2

    if len(source) > MAX_PARSE_CHARS:
        raise TemplateError(f"the model's {what} is {len(source)} characters long (limit {MAX_PARSE_CHARS})")
    try:
        environment.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"the model's {what} is not valid Jinja (line {exc.lineno}: {exc.message}); "
            "pass a working one with --chat-template"
        ) from exc
    except (RecursionError, MemoryError) as exc:
        raise TemplateError(f"the model's {what} is nested too deeply to parse ({type(exc).__name__})") from exc


# --------------------------------------------------------------------------- the worker side


def _too_big(operator: str, left: Any, right: Any) -> str | None:
    """Why `left <operator> right` would be too large to compute, or None."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def length(value: Any) -> int | None:
        return len(value) if isinstance(value, (str, bytes, list, tuple)) else None

    if operator == "**" and is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
        if right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
            return f"{left} ** {right} has more than {MAX_INT_BITS} bits"
    if operator == "*":
        if is_int(left) and is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            return f"a product of more than {MAX_INT_BITS} bits"
        for sequence, times in ((left, right), (right, left)):
            if length(sequence) is not None and is_int(times) and length(sequence) * max(times, 0) > MAX_OUTPUT_CHARS:
                return f"repeating a sequence of {length(sequence)} items {times} times"
    if operator == "+" and length(left) is not None and length(right) is not None:
        if length(left) + length(right) > MAX_OUTPUT_CHARS:
            return f"joining sequences past {MAX_OUTPUT_CHARS} items"
    return None


def bounded_environment(factory: str):
    """The Jinja environment `factory` ("module:function") builds, with size-checked `**`, `*`, `+`."""
    import types

    import jinja2.exceptions

    module, _, function = factory.partition(":")
    environment = getattr(importlib.import_module(module), function)()
    plain_binop = environment.call_binop

    def call_binop(self, context, operator, left, right):
        why = _too_big(operator, left, right)
        if why is not None:
            raise jinja2.exceptions.SecurityError(f"the template computes too large a value: {why}")
        return plain_binop(context, operator, left, right)

    environment.intercepted_binops = frozenset({"**", "*", "+"})
    environment.call_binop = types.MethodType(call_binop, environment)
    return environment


def _render_one(environment, cache: dict, request: dict) -> dict:
    import jinja2.exceptions

    source = request["source"]
    try:
        template = cache.get(source)
        if template is None:
            if len(cache) >= 32:
                cache.clear()
            template = cache[source] = environment.from_string(source)
        parts, total = [], 0
        for chunk in template.generate(**request["context"]):
            total += len(chunk)
            if total > MAX_OUTPUT_CHARS:
                return {"error": "limit", "message": f"the output passed {MAX_OUTPUT_CHARS} characters"}
            parts.append(chunk)
        return {"text": "".join(parts)}
    except jinja2.exceptions.SecurityError as exc:
        return {"error": "security", "message": str(exc)}
    except jinja2.exceptions.TemplateError as exc:  # raise_exception(), undefined names, ...
        return {"error": "template", "message": exc.message or str(exc)}
    except MemoryError:
        return {"error": "limit", "message": f"it needed more than {MEMORY_LIMIT_BYTES >> 20} MiB of memory"}
    except RecursionError:
        return {"error": "limit", "message": "it recursed too deeply"}
    except Exception as exc:  # TypeError, ValueError, OverflowError... from the template's own operations
        return {"error": "data", "message": f"{type(exc).__name__}: {exc}"}


def worker_main(factory: str, memory_limit: int) -> None:
    """The worker: read JSON requests from stdin, write one JSON answer line each to stdout."""
    import resource

    if memory_limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    environment = bounded_environment(factory)
    cache: dict = {}
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            answer = _render_one(environment, cache, json.loads(line))
        except MemoryError:
            answer = {"error": "limit", "message": "it needed too much memory"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


# --------------------------------------------------------------------------- the caller side


class TemplateWorker:
    """One worker process rendering templates for this process; started on first use and again
    after a render killed it. Renders are serialized (they take milliseconds)."""

    def __init__(self, environment: str, timeout_s: float = RENDER_TIMEOUT_S,
                 memory_limit: int = MEMORY_LIMIT_BYTES):
        self.environment = environment
        self.timeout_s = timeout_s
        self.memory_limit = memory_limit
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        command = [sys.executable, "-c",
                   "import sys; from mistralrs_jax.loading.template_sandbox import worker_main; "
                   "worker_main(sys.argv[1], int(sys.argv[2]))", self.environment, str(self.memory_limit)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, encoding="utf-8")
        if self._read_line(process, STARTUP_TIMEOUT_S) is None:
            self._kill(process)
            raise TemplateError("the chat template worker process did not start")
        log.debug("chat template worker started (pid %d)", process.pid)
        return process

    @staticmethod
    def _read_line(process: subprocess.Popen, timeout_s: float) -> str | None:
        """One line from the worker, or None when it died or the deadline passed."""
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                line = process.stdout.readline()
                return line or None

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            stream.close()

    def _exchange(self, request: str) -> tuple[str | None, bool]:
        """(the worker's answer line or None, whether the deadline passed). A worker found dead
        before the request was taken is replaced once; one that dies or overruns is killed."""
        for _ in range(2):
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
            process = self._process
            try:
                process.stdin.write(request)
                process.stdin.flush()
            except OSError:  # it died since the last render
                self._kill(process)
                self._process = None
                continue
            started = time.monotonic()
            line = self._read_line(process, self.timeout_s)
            if line is None:
                self._kill(process)
                self._process = None
                return None, time.monotonic() - started >= self.timeout_s
            return line, False
        raise TemplateError("the chat template worker process keeps dying")

    def render(self, source: str, context: dict[str, Any], what: str = "chat template") -> str:
        """`source` rendered with `context` (JSON-like data) within the bounds, or a TemplateError."""
        try:
            request = json.dumps({"source": source, "context": context}) + "\n"
        except (TypeError, ValueError) as exc:
            raise TemplateError(f"the {what}'s variables cannot be passed to the renderer: {exc}") from exc
        with self._lock:
            line, timed_out = self._exchange(request)
            if line is None:
                if timed_out:
                    raise TemplateError(f"the {what} did not finish rendering within {self.timeout_s:g} s; it was "
                                        "stopped (a runaway loop or computation in the template?)")
                raise TemplateError(f"the {what} exhausted the renderer's limits "
                                    f"({self.memory_limit >> 20} MiB) and was stopped")
        answer = json.loads(line)
        if "text" in answer:
            return answer["text"]
        kind, message = answer.get("error"), answer.get("message", "")
        if kind == "security":
            raise TemplateError(f"{what} tried an operation the sandbox forbids: {message}")
        if kind == "template":
            raise TemplateError(f"{what} error: {message}")
        if kind == "limit":
            raise TemplateError(f"{what} was stopped: {message}")
        raise TemplateError(f"{what} failed on these messages: {message}")

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._kill(self._process)
                self._process = None


_workers: dict[str, TemplateWorker] = {}
_workers_lock = threading.Lock()


def shared_worker(environment: str) -> TemplateWorker:
    """The process-wide worker for the environment factory `environment`."""
    with _workers_lock:
        worker = _workers.get(environment)
        if worker is None:
            worker = _workers[environment] = TemplateWorker(environment)
        return worker
