"""`GET /openapi.json`: the API described as OpenAPI 3.1, generated from the pydantic models.

The request bodies are the very models the routes validate with (schemas.py), so the
description cannot drift from what the server accepts. The response bodies are described
by the models below, which mirror what the routes write; tests/test_openapi.py drives the
server with schemathesis and checks every answer against this document.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .schemas import ChatCompletionRequest, CompletionRequest, LoraLoadRequest

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"


class _Open(BaseModel):
    """Responses may carry more fields than documented (clients must ignore unknown ones)."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(_Open):
    """Every failure, 4xx or 5xx, in OpenAI's error shape."""

    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    isq_type: str | None = None


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Open):
    status: Literal["ok", "draining", "error"]
    model: str
    detail: str | None = None


class ServerStatus(_Open):
    model: dict[str, Any]
    engine: dict[str, Any]
    metrics: dict[str, Any]
    server: dict[str, Any]


class ReIsqRequest(_Open):
    isq_type: str | int | None = None
    ggml_type: str | int | None = None


class LoraCard(_Open):
    id: str
    object: Literal["lora"]
    slot: int
    path: str
    rank: int
    modules: int
    model: str


class LoraList(_Open):
    object: Literal["list"]
    max_loras: int
    max_lora_rank: int
    data: list[LoraCard]


class LoraDeleted(_Open):
    id: str
    object: Literal["lora"]
    deleted: bool
    running_requests: int


class ReIsqResponse(_Open):
    object: Literal["re_isq"]
    model: str
    isq_type: str | None


REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, ReIsqRequest,
                                              LoraLoadRequest)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (ErrorResponse, ChatCompletion, Completion, ModelCard, ModelList,
                                               Health, ServerStatus, ReIsqResponse, LoraCard, LoraList, LoraDeleted)

# One server-sent event, as OpenAPI describes text/event-stream (the schema is per event): the
# `data` of each is a JSON chunk, and the last one is `[DONE]`.
_SSE = {"text/event-stream": {"schema": {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk (chat.completion.chunk or text_completion), "
                                                  "then `[DONE]`"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}}}
# What any route may answer besides its own success: auth (with --api-key), and server-side failures.
_COMMON_ERRORS = {"401": "missing or wrong API key (servers started with --api-key)",
                  "500": "the engine failed on this request"}
_GENERATION_ERRORS = {"400": "an invalid request (the error names the parameter)",
                      "404": "the model named is not served here",
                      "413": "the request body is larger than the server accepts",
                      "503": "overloaded (the waiting queue is full) or shutting down; see Retry-After"}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _responses(ok: type[BaseModel] | None, errors: dict[str, str], stream: bool = False,
               ok_text: str = "success") -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if ok is not None:
        content = _json(ok)
        if stream:
            content = {**content, **_SSE}
        responses["200"] = {"description": ok_text, "content": content}
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
    for status, text in {**errors, **_COMMON_ERRORS}.items():
        responses[status] = {"description": text, "content": _json(ErrorResponse)}
        if status == "503":
            responses[status]["headers"] = retry
    return responses


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": _json(model)}


def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in REQUEST_MODELS + RESPONSE_MODELS:
        mode = "validation" if model in REQUEST_MODELS else "serialization"
        schema = model.model_json_schema(by_alias=True, ref_template=REF, mode=mode)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def build_openapi(title: str = "mistralrs-jax", version: str = "0", model_name: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this server's routes."""
    not_supported = {"400": "the feature behind this route is not available"}
    paths = {
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion", "summary": "A chat completion, whole or streamed (SSE)",
            "requestBody": _body(ChatCompletionRequest),
            "responses": _responses(ChatCompletion, _GENERATION_ERRORS, stream=True)}},
        "/v1/completions": {"post": {
            "operationId": "createCompletion", "summary": "A text completion, whole or streamed (SSE)",
            "requestBody": _body(CompletionRequest),
            "responses": _responses(Completion, _GENERATION_ERRORS, stream=True)}},
        "/v1/models": {"get": {"operationId": "listModels", "summary": "The served model",
                               "responses": _responses(ModelList, {})}},
        "/v1/models/{model_id}": {"get": {
            "operationId": "retrieveModel", "summary": "One model card",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": _responses(ModelCard, {"404": "no such model"})}},
        "/health": {"get": {"operationId": "health", "summary": "Liveness: 200 while serving, 503 while "
                                                                 "draining for shutdown or when the engine died",
                            "responses": {
                                "200": {"description": "serving", "content": _json(Health)},
                                "503": {"description": "draining or dead", "content": _json(Health)}}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "the text exposition format", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}},
                                 "401": _responses(None, {})["401"]}}},
        "/v1/status": {"get": {"operationId": "status", "summary": "JSON status for dashboards",
                               "responses": _responses(ServerStatus, {})}},
        "/v1/re_isq": {"post": {"operationId": "reIsq", "summary": "Re-quantize the served model",
                                "requestBody": _body(ReIsqRequest),
                                "responses": _responses(ReIsqResponse, {**not_supported, "413": "body too large"})}},
        "/v1/loras": {
            "get": {"operationId": "listLoras", "summary": "Loaded per-request LoRA adapters (--lora-mode dynamic)",
                    "responses": _responses(LoraList, not_supported)},
            "post": {"operationId": "loadLora", "summary": "Load a PEFT LoRA adapter into a free slot while serving",
                     "requestBody": _body(LoraLoadRequest),
                     "responses": {"201": {"description": "loaded", "content": _json(LoraCard)},
                                   **_responses(None, {"400": "not a usable adapter (the error says why), or the "
                                                              "server has no per-request LoRA",
                                                       "409": "every slot is taken, or the name is loaded",
                                                       "413": "body too large"})}}},
        "/v1/loras/{model_id}": {"delete": {
            "operationId": "unloadLora", "summary": "Remove an adapter (running requests finish with it)",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "description": "the adapter's name",
                            "schema": {"type": "string"}}],
            "responses": _responses(LoraDeleted, {**not_supported, "404": "no adapter of that name is loaded"})}},
        "/v1/images/generations": {"post": {
            "operationId": "createImage", "summary": "Not available (text models only)",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": _responses(None, {**not_supported, "413": "body too large"})}},
    }
    description = "An OpenAI-compatible LLM inference server on JAX/XLA"
    if model_name:
        description += f", serving {model_name}"
    return {"openapi": OPENAPI_VERSION, "info": {"title": title, "version": version, "description": description},
            "paths": paths, "components": {"schemas": _components(),
                                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
