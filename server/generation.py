"""Between a validated request and the engine: tokenize, submit, wait or stream, abort.

Everything that may take CPU time (template rendering, tokenization, validation) runs in
a worker thread, so the event loop keeps serving other clients. A request whose client
goes away (its task is cancelled) has its sequences aborted at once, which frees their
KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from mistralrs_jax.engine.request import CompletionDelta, RequestHandle
from mistralrs_jax.errors import MistralRsError
from mistralrs_jax.outputs import RequestOutput
from mistralrs_jax.sampling_params import SamplingParams

from .errors import APIError
from .state import ServerState

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # the prompt as text, when the client sent text (echo uses it)
    multimodal: Any = None  # image features of a vision model's prompt (engine/multimodal.py)


# As mistral.rs: a truncated prompt leaves room for max_tokens, or for this many when unset.
TRUNCATE_DEFAULT_ROOM = 10


def _truncated(ids: list[int], params: SamplingParams, context_len: int) -> list[int]:
    """`--truncate-sequence` (mistral.rs' rule): keep the end of a too-long prompt, leaving
    room for max_tokens (or TRUNCATE_DEFAULT_ROOM) new tokens in the context."""
    room = min(params.max_tokens or TRUNCATE_DEFAULT_ROOM, context_len - 1)
    keep = context_len - room
    log.info("prompt of %d tokens truncated to its last %d (--truncate-sequence)", len(ids), keep)
    return ids[-keep:]


def abort_unfinished(handles: Sequence[RequestHandle]) -> None:
    for handle in handles:
        if not handle.finished:
            handle.abort()


async def submit(state: ServerState, make_prompts: Callable[[], list[Prompt]], params: SamplingParams,
                 request_id: str, prompt_param: str) -> tuple[list[Prompt], list[RequestHandle]]:
    """Build the prompts and add one engine request per prompt, off the event loop.

    An engine validation error becomes a 4xx; one about the prompt names `prompt_param`.
    """

    def work() -> tuple[list[Prompt], list[RequestHandle]]:
        prompts = make_prompts()
        handles: list[RequestHandle] = []
        try:
            for index, prompt in enumerate(prompts):
                ids = prompt.token_ids
                # Cutting the front off would orphan image positions: image prompts are never truncated.
                if state.truncate_sequence and len(ids) >= state.context_len and prompt.multimodal is None:
                    ids = prompt.token_ids = _truncated(ids, params, state.context_len)
                rid = request_id if len(prompts) == 1 else f"{request_id}-{index}"
                handles.append(state.engine.add_request(ids, params, request_id=rid, prompt=prompt.text,
                                                        multimodal=prompt.multimodal))
        except BaseException:
            abort_unfinished(handles)
            raise
        return prompts, handles

    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        prompts, handles = await asyncio.shield(future)
    except asyncio.CancelledError:
        # The client left while we tokenized: whatever was submitted must not run on.
        future.add_done_callback(
            lambda f: abort_unfinished(f.result()[1]) if not f.cancelled() and f.exception() is None else None)
        raise
    except MistralRsError as exc:
        raise APIError.from_engine(exc, prompt_param=prompt_param) from None
    # Safety net: if this request's task is cancelled (the client left) at a moment when no
    # generator of ours is running to notice, e.g. before a stream's first chunk, abort anyway.
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(lambda t: abort_unfinished(handles) if t.cancelled() else None)
    return prompts, handles


def _engine_failure(exc: BaseException) -> APIError:
    return APIError(500, f"the engine failed while generating: {type(exc).__name__}: {exc}",
                    error_type="server_error")


async def collect(handles: Sequence[RequestHandle]) -> list[RequestOutput]:
    """Wait for every request to finish; abort them all if the client leaves."""

    async def one(handle: RequestHandle) -> RequestOutput:
        async for _ in handle:
            pass
        return handle.result()

    try:
        return list(await asyncio.gather(*(one(h) for h in handles)))
    except BaseException as exc:
        abort_unfinished(handles)
        if isinstance(exc, Exception) and not isinstance(exc, APIError):
            raise _engine_failure(exc) from exc
        raise


async def stream_deltas(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, CompletionDelta]]:
    """(prompt index, delta) from all requests as they arrive; aborts them all if the consumer stops early."""
    try:
        if len(handles) == 1:
            async for delta in handles[0]:
                yield 0, delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            try:
                async for delta in handle:
                    queue.put_nowait((index, delta))
            except Exception as exc:
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
    except Exception as exc:
        raise _engine_failure(exc) from exc
    finally:
        abort_unfinished(handles)
