"""RequestHandle: the per-request stream of deltas that sync and asyncio code consume."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from ..outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class CompletionDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class RequestHandle:
    """Filled by the engine thread, read by anyone: `for delta in handle`,
    `async for delta in handle`, or `handle.result()`."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int, engine=None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.n = n
        self._engine = engine
        self._outputs = [CompletionOutput(index=i) for i in range(n)]
        self._deltas: list[CompletionDelta] = []
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.error: BaseException | None = None
        self.metrics: dict = {}

    # -- engine side ---------------------------------------------------------------

    def _push(self, delta: CompletionDelta) -> None:
        out = self._outputs[delta.index]
        out.text += delta.text
        out.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            out.logprobs = (out.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.stop_reason = delta.stop_reason
        with self._cond:
            self._deltas.append(delta)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        for out in self._outputs:
            if out.finish_reason is None:
                self._push(CompletionDelta(index=out.index, finish_reason="abort"))

    # -- consumer side -------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self._outputs)

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas) and not self.finished:
                    self._cond.wait()
                batch = self._deltas[i:]
                done = self.finished
            i += len(batch)
            yield from batch
            if done and i >= len(self._deltas):
                break
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        try:
            i = 0
            while True:
                with self._cond:
                    batch = self._deltas[i:]
                    done = self.finished
                    event.clear()
                i += len(batch)
                for delta in batch:
                    yield delta
                if done and i >= len(self._deltas):
                    break
                if not batch:
                    await event.wait()
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> RequestOutput:
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout=timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=self._outputs, finished=True, metrics=dict(self.metrics),
        )

    def abort(self) -> None:
        if self._engine is not None:
            self._engine.abort(self.request_id)
