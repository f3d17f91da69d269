"""`POST /v1/chat/completions`: OpenAI chat completions, whole or streamed (SSE)."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from quart import Blueprint, Response, g

from mistralrs_jax.engine.request import RequestHandle
from mistralrs_jax.errors import MistralRsError

from .bodies import json_response, read_json_body, sse_response, usage
from .errors import APIError
from .generation import Prompt, abort_unfinished, collect, stream_deltas, submit
from .logprobs import chat_logprobs
from .request_log import Exchange
from .schemas import ChatCompletionRequest, parse_request
from .sse import DONE, sse_event
from .state import ServerState, server_state

blueprint = Blueprint("chat", __name__)


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    state = server_state()
    req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await read_json_body())
    state.check_model(req.model)
    try:
        params = req.sampling_params(max_tokens=req.max_new_tokens, logprobs=req.logprobs_k,
                                     default_seed=state.default_seed)
    except MistralRsError as exc:
        raise APIError.from_engine(exc) from None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    exchange: Exchange = g.exchange
    exchange.request_id, exchange.stream = request_id, req.streaming
    messages = req.message_dicts()
    add_generation_prompt = req.add_generation_prompt is not False
    llm = state.llm

    def make_prompts() -> list[Prompt]:
        ids, text, multimodal = llm.chat_prompt(messages, add_generation_prompt=add_generation_prompt,
                                                local_images=state.local_images)
        return [Prompt(ids, text, multimodal)]

    prompts, handles = await submit(state, make_prompts, params, request_id, prompt_param="messages")
    prompt_tokens = len(prompts[0].token_ids)
    exchange.prompt_tokens = prompt_tokens
    if req.streaming:
        return sse_response(_stream(state, req, request_id, handles[0], prompt_tokens, exchange))

    output = (await collect(handles))[0]
    choices = []
    for out in output.outputs:
        logprobs = None
        if req.logprobs_k is not None:
            logprobs = chat_logprobs(out.token_ids, out.logprobs or [], req.logprobs_k)
        choices.append({"index": out.index, "message": {"role": "assistant", "content": out.text},
                        "logprobs": logprobs, "finish_reason": out.finish_reason})
    completion_tokens = sum(len(out.token_ids) for out in output.outputs)
    exchange.completion_tokens = completion_tokens
    exchange.finish_reasons = [out.finish_reason for out in output.outputs]
    exchange.response = [out.text for out in output.outputs]
    return json_response({
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
        "system_fingerprint": None, "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
    })


async def _stream(state: ServerState, req: ChatCompletionRequest, request_id: str, handle: RequestHandle,
                  prompt_tokens: int, exchange: Exchange) -> AsyncIterator[bytes]:
    created = int(time.time())
    include_usage = req.include_usage_in_stream
    top_k = req.logprobs_k
    n = handle.n
    texts, finishes = [""] * n, [None] * n
    completion_tokens = 0

    def chunk(choice: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": state.model_name, "system_fingerprint": None, "choices": [choice]}
        if include_usage:  # OpenAI: every chunk carries "usage": null, the last one the totals
            body["usage"] = None
        return sse_event(body)

    try:
        for index in range(n):
            yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        async for _, delta in stream_deltas([handle]):
            completion_tokens += len(delta.token_ids)
            texts[delta.index] += delta.text
            logprobs = None
            if top_k is not None and delta.logprobs:
                logprobs = chat_logprobs(delta.token_ids, delta.logprobs, top_k)
            if delta.text or logprobs:
                yield chunk({"index": delta.index, "delta": {"content": delta.text}, "logprobs": logprobs,
                             "finish_reason": None})
            if delta.finish_reason is not None:
                finishes[delta.index] = delta.finish_reason
                yield chunk({"index": delta.index, "delta": {}, "logprobs": None,
                             "finish_reason": delta.finish_reason})
        if include_usage:
            yield sse_event({"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": state.model_name, "system_fingerprint": None, "choices": [],
                             "usage": usage(prompt_tokens, completion_tokens)})
        yield DONE
        exchange.status = 200
    except APIError as error:  # the engine failed mid-stream: tell the client in-band
        exchange.status, exchange.error = error.status, error.message
        yield sse_event(error.body())
    finally:
        abort_unfinished([handle])  # the client left (or the stream broke): free the blocks now
        exchange.end_stream(state.request_log, completion_tokens, finishes, texts)

