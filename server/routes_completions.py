"""`POST /v1/completions`: OpenAI's legacy text completions (one or many prompts, text or token ids)."""
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
from .logprobs import LegacyLogprobs
from .request_log import Exchange
from .schemas import CompletionRequest, parse_request
from .sse import DONE, sse_event
from .state import ServerState, server_state

blueprint = Blueprint("completions", __name__)


@blueprint.post("/v1/completions")
async def completions() -> Response:
    state = server_state()
    req: CompletionRequest = parse_request(CompletionRequest, await read_json_body())
    state.check_model(req.model)
    try:
        params = req.sampling_params(max_tokens=req.max_new_tokens, logprobs=req.logprobs,
                                     default_seed=state.default_seed, guided_decoding=req.guided_decoding())
        params = state.with_lora(params, req.model, req.lora)
    except MistralRsError as exc:
        raise APIError.from_engine(exc) from None
    request_id = f"cmpl-{uuid.uuid4().hex}"
    exchange: Exchange = g.exchange
    exchange.request_id, exchange.stream = request_id, req.streaming
    raw_prompts = req.prompts()
    tokenizer = state.llm.tokenizer
    echo = bool(req.echo)

    def make_prompts() -> list[Prompt]:
        prompts = []
        for prompt in raw_prompts:
            if isinstance(prompt, str):
                prompts.append(Prompt(tokenizer.encode(prompt, add_special_tokens=True), prompt))
            else:  # token ids: echo shows them as text, once they are known to be in the vocabulary
                state.engine.validate(list(prompt), params)
                prompts.append(Prompt(list(prompt), tokenizer.decode(prompt, skip_special_tokens=False)
                                      if echo else None))
        return prompts

    prompts, handles = await submit(state, make_prompts, params, request_id, prompt_param="prompt")
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    exchange.prompt_tokens = prompt_tokens
    echoes = [(p.text or "") if echo else "" for p in prompts]
    if req.streaming:
        return sse_response(_stream(state, req, request_id, handles, echoes, prompt_tokens, exchange))

    outputs = await collect(handles)
    n = params.n
    choices = []
    for prompt_index, output in enumerate(outputs):
        for out in output.outputs:
            logprobs = None
            if req.logprobs is not None:
                logprobs = LegacyLogprobs(len(echoes[prompt_index])).block(out.token_ids, out.logprobs or [])
            choices.append({"index": prompt_index * n + out.index, "text": echoes[prompt_index] + out.text,
                            "logprobs": logprobs, "finish_reason": out.finish_reason})
    completion_tokens = sum(len(out.token_ids) for output in outputs for out in output.outputs)
    exchange.completion_tokens = completion_tokens
    exchange.finish_reasons = [choice["finish_reason"] for choice in choices]
    exchange.response = [choice["text"] for choice in choices]
    return json_response({
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
        "system_fingerprint": None, "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
    })


async def _stream(state: ServerState, req: CompletionRequest, request_id: str, handles: list[RequestHandle],
                  echoes: list[str], prompt_tokens: int, exchange: Exchange) -> AsyncIterator[bytes]:
    created = int(time.time())
    include_usage = req.include_usage_in_stream
    n = handles[0].n
    total = n * len(handles)
    texts, finishes = [""] * total, [None] * total
    offsets = [LegacyLogprobs(len(echoes[i // n])) for i in range(total)]
    completion_tokens = 0

    def chunk(index: int, text: str, logprobs: Any = None, finish_reason: str | None = None) -> bytes:
        body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                "model": state.model_name, "system_fingerprint": None,
                                "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse_event(body)

    try:
        for index in range(total):
            if echoes[index // n]:
                texts[index] += echoes[index // n]
                yield chunk(index, echoes[index // n])
        async for prompt_index, delta in stream_deltas(handles):
            index = prompt_index * n + delta.index
            completion_tokens += len(delta.token_ids)
            texts[index] += delta.text
            logprobs = None
            if req.logprobs is not None and delta.logprobs:
                logprobs = offsets[index].block(delta.token_ids, delta.logprobs)
            if delta.text or logprobs:
                yield chunk(index, delta.text, logprobs)
            if delta.finish_reason is not None:
                finishes[index] = delta.finish_reason
                yield chunk(index, "", None, delta.finish_reason)
        if include_usage:
            yield sse_event({"id": request_id, "object": "text_completion", "created": created,
                             "model": state.model_name, "system_fingerprint": None, "choices": [],
                             "usage": usage(prompt_tokens, completion_tokens)})
        yield DONE
        exchange.status = 200
    except APIError as error:
        exchange.status, exchange.error = error.status, error.message
        yield sse_event(error.body())
    finally:
        abort_unfinished(handles)
        exchange.end_stream(state.request_log, completion_tokens, finishes, texts)
