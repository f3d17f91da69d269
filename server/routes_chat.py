"""`POST /v1/chat/completions`: OpenAI chat completions, whole or streamed (SSE), with tool calls
and constrained output (response_format, grammar)."""
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
from .tools import (HERMES, ToolCall, ToolStreamFilter, call_format, forced_calls, messages_for_template,
                    new_call_id, parse_tool_calls, with_ids)

blueprint = Blueprint("chat", __name__)


class ToolOutput:
    """How one request's replies become OpenAI messages: plain text, or tool calls (see tools.py)."""

    def __init__(self, mode: str | None, fmt: str, parallel: bool = True):
        self.mode = mode  # None, "auto", "required" or a forced function name
        self.fmt = fmt
        self.parallel = parallel  # parallel_tool_calls: false keeps a free reply's first call only

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a complete free ("auto") reply."""
        content, calls = parse_tool_calls(text, self.fmt)
        return content, with_ids(calls if self.parallel else calls[:1], self.fmt)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message for a whole reply, and its finish reason ("tool_calls" when it calls)."""
        calls: list[ToolCall] = []
        content: str | None = text
        if self.mode == "auto":
            content, calls = self.parse(text)
        elif self.mode is not None:
            calls = with_ids(forced_calls(text, self.mode) or [], self.fmt)
            content = None if calls else text
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        message = {"role": "assistant", "content": content, "tool_calls": [call.to_openai() for call in calls]}
        return message, "tool_calls" if finish_reason == "stop" else finish_reason


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    state = server_state()
    req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await read_json_body())
    state.check_model(req.model)
    llm = state.llm
    template = llm.chat_template
    tools = req.tools if req.tool_mode is not None else None
    fmt = call_format(template.source) if template.reads_tools else HERMES
    try:
        template_kwargs = req.template_kwargs(template.reads)
        overrides = {}
        if req.tool_mode == "auto" and fmt != HERMES and req.skip_special_tokens is None:
            overrides["skip_special_tokens"] = False  # [TOOL_CALLS] / <|python_tag|> are special tokens
        params = req.sampling_params(max_tokens=req.max_new_tokens, logprobs=req.logprobs_k,
                                     default_seed=state.default_seed, guided_decoding=req.guided_decoding(),
                                     **overrides)
        params = state.with_lora(params, req.model, req.lora)
    except MistralRsError as exc:
        raise APIError.from_engine(exc) from None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    exchange: Exchange = g.exchange
    exchange.request_id, exchange.stream = request_id, req.streaming
    messages = messages_for_template(req.message_dicts(), tools, template.reads_tools, fmt)
    if tools and template.reads_tools:
        template_kwargs["tools"] = tools
    add_generation_prompt = req.add_generation_prompt is not False
    tool_output = ToolOutput(req.tool_mode, fmt, parallel=req.parallel_tool_calls is not False)

    def make_prompts() -> list[Prompt]:
        ids, text, multimodal = llm.chat_prompt(messages, add_generation_prompt=add_generation_prompt,
                                                local_images=state.local_images, **template_kwargs)
        return [Prompt(ids, text, multimodal)]

    prompts, handles = await submit(state, make_prompts, params, request_id, prompt_param="messages")
    prompt_tokens = len(prompts[0].token_ids)
    exchange.prompt_tokens = prompt_tokens
    if req.streaming:
        return sse_response(_stream(state, req, request_id, handles[0], prompt_tokens, exchange, tool_output))

    output = (await collect(handles))[0]
    choices = []
    for out in output.outputs:
        logprobs = None
        if req.logprobs_k is not None:
            logprobs = chat_logprobs(out.token_ids, out.logprobs or [], req.logprobs_k)
        message, finish_reason = tool_output.message(out.text, out.finish_reason)
        choices.append({"index": out.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
    completion_tokens = sum(len(out.token_ids) for out in output.outputs)
    exchange.completion_tokens = completion_tokens
    exchange.finish_reasons = [choice["finish_reason"] for choice in choices]
    exchange.response = [out.text for out in output.outputs]
    return json_response({
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
        "system_fingerprint": None, "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
    })


class _ChoiceStream:
    """The delta objects of one streamed choice, as OpenAI shapes them (text, or tool-call pieces)."""

    def __init__(self, tool_output: ToolOutput):
        self.mode = tool_output.mode
        self.parallel = tool_output.parallel
        self.fmt = tool_output.fmt
        self.filter = ToolStreamFilter(tool_output.fmt) if self.mode == "auto" else None
        self.forced_call: ToolCall | None = None
        self.held = ""  # a "required" reply is parsed when complete
        self.called = False

    def on_text(self, text: str) -> list[dict[str, Any]]:
        if self.mode is None:
            return [{"content": text}] if text else []
        if self.filter is not None:
            text = self.filter.feed(text)
            return [{"content": text}] if text else []
        if self.mode == "required":
            self.held += text
            return []
        deltas = []  # a named function: its arguments stream as they come
        if self.forced_call is None:
            self.forced_call = ToolCall(self.mode, "", new_call_id(self.fmt))
            deltas.append({"tool_calls": [{**self.forced_call.to_openai(0)}]})
        self.held += text
        if text:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        self.called = True
        return deltas

    def on_finish(self) -> list[dict[str, Any]]:
        if self.mode is None or (self.mode not in ("auto", "required") and self.forced_call is not None):
            return []
        if self.filter is not None:
            content, calls = self.filter.finish()
            calls = calls if self.parallel else calls[:1]
        else:
            calls = (forced_calls(self.held, "required") or []) if self.mode == "required" else []
            content = "" if calls else self.held
        calls = with_ids(calls, self.fmt)
        deltas = [{"content": content}] if content else []
        for index, call in enumerate(calls):
            deltas.append({"tool_calls": [{**call.to_openai(index), "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        self.called = bool(calls)
        return deltas


async def _stream(state: ServerState, req: ChatCompletionRequest, request_id: str, handle: RequestHandle,
                  prompt_tokens: int, exchange: Exchange, tool_output: ToolOutput) -> AsyncIterator[bytes]:
    created = int(time.time())
    include_usage = req.include_usage_in_stream
    top_k = req.logprobs_k
    n = handle.n
    texts, finishes = [""] * n, [None] * n
    choices = [_ChoiceStream(tool_output) for _ in range(n)]
    completion_tokens = 0

    def chunk(choice: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": state.model_name, "system_fingerprint": None, "choices": [choice]}
        if include_usage:  # OpenAI: every chunk carries "usage": null, the last one the totals
            body["usage"] = None
        return sse_event(body)

    try:
        # A forced call streams no text: its first delta's content is null, as OpenAI sends it.
        first_content = None if tool_output.mode not in (None, "auto") else ""
        for index in range(n):
            yield chunk({"index": index, "delta": {"role": "assistant", "content": first_content}, "logprobs": None,
                         "finish_reason": None})
        async for _, delta in stream_deltas([handle]):
            completion_tokens += len(delta.token_ids)
            texts[delta.index] += delta.text
            logprobs = None
            if top_k is not None and delta.logprobs:
                logprobs = chat_logprobs(delta.token_ids, delta.logprobs, top_k)
            stream = choices[delta.index]
            pieces = stream.on_text(delta.text)
            if logprobs and not pieces:
                pieces = [{"content": ""}]
            for piece_index, piece in enumerate(pieces):
                yield chunk({"index": delta.index, "delta": piece, "logprobs": logprobs if piece_index == 0 else None,
                             "finish_reason": None})
            if delta.finish_reason is not None:
                for piece in stream.on_finish():
                    yield chunk({"index": delta.index, "delta": piece, "logprobs": None, "finish_reason": None})
                finish = delta.finish_reason
                if stream.called and finish == "stop":
                    finish = "tool_calls"
                finishes[delta.index] = finish
                yield chunk({"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": finish})
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
