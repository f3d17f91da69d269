"""Everything but generation: models, health, Prometheus metrics, JSON status, and the
routes mistral.rs has whose features this engine lacks yet (answered with a clear 400)."""
from __future__ import annotations

import dataclasses
from typing import Any

from quart import Blueprint, Response

from mistralrs_jax.errors import NotSupportedError
from mistralrs_jax.memory import read_local_memory

from .bodies import json_response
from .errors import APIError
from .prometheus import render
from .state import DEFAULT_MODEL_ALIAS, server_state

blueprint = Blueprint("admin", __name__)


def _model_card(adapter: str | None = None) -> dict[str, Any]:
    """The served model's card, or with `adapter` the card of `base:adapter` (per-request LoRA)."""
    state = server_state()
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "local",
            "isq_type": getattr(state.llm, "isq_type", None)}
    if adapter is not None:
        card.update(id=f"{state.model_name}:{adapter}", parent=state.model_name)
    return card


@blueprint.get("/v1/models")
async def list_models() -> Response:
    adapters = server_state().lora_names() or []
    return json_response({"object": "list", "data": [_model_card()] + [_model_card(a) for a in adapters]})


@blueprint.get("/v1/models/<path:model_id>")
async def retrieve_model(model_id: str) -> Response:
    state = server_state()
    base, sep, adapter = model_id.rpartition(":")
    if sep and base == state.model_name and adapter in (state.lora_names() or []):
        return json_response(_model_card(adapter))
    if model_id not in (state.model_name, DEFAULT_MODEL_ALIAS):
        raise APIError(404, f"the model {model_id!r} does not exist on this server; it serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return json_response(_model_card())


@blueprint.get("/health")
async def health() -> Response:
    state = server_state()
    if not state.engine.is_alive():
        return json_response({"status": "error", "model": state.model_name, "detail": "engine loop is not running"},
                             status=503)
    return json_response({"status": "ok", "model": state.model_name})


@blueprint.get("/metrics")
async def metrics() -> Response:
    body, content_type = render(server_state().metrics_registry)
    return Response(body, status=200, content_type=content_type)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@blueprint.get("/v1/status")
async def status() -> Response:
    """One JSON document for dashboards: model, engine settings, the metrics snapshot, server counters."""
    state = server_state()
    llm, engine = state.llm, state.engine
    limits = engine.limits
    return json_response({
        "model": {"id": state.model_name, "path": llm.model_path, "max_model_len": limits.max_model_len,
                  "isq_type": getattr(llm, "isq_type", None), "weight_bytes": getattr(llm, "weight_bytes", None),
                  "config": _plain(llm.model_config)},
        "engine": {"config": _plain(engine.config), "token_buckets": list(limits.token_buckets),
                   "seq_buckets": list(limits.seq_buckets)},
        "metrics": _plain(engine.stats()),
        "runtime": _runtime(),
        "memory": read_local_memory().as_dict(),
        # {"tensor_parallel_size", "devices", "per_device": weight / KV bytes held, memory stats}
        "mesh": engine.mesh_report(),
        "loras": _loras(llm),
        "server": {"api_key_required": state.api_key is not None,
                   "request_logging": state.request_log is not None,
                   "http_responses": [{"route": route, "status": code, "count": count}
                                      for (route, code), count in sorted(state.http_responses.items())]},
    })


def _loras(llm) -> dict | None:
    """Per-request LoRA (--lora-mode dynamic): its slots and the adapters in them; None without it."""
    slots = getattr(llm, "adapter_slots", None)
    if slots is None:
        return None
    return {"max_loras": slots.num_slots, "max_lora_rank": slots.held.max_rank,
            "stack_bytes": slots.held.nbytes, "loaded": [a.card() for a in slots.list()]}


def _runtime() -> dict:
    import jax

    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]}


@blueprint.post("/v1/re_isq")
async def re_isq() -> Response:
    """Re-quantize the served model: {"isq_type": "Q8_0"} (mistral.rs names it "ggml_type").

    Synchronous: the answer comes once the new weights serve. `LLM.re_isq` lets the requests
    in flight finish first; it runs in a worker thread so the event loop keeps streaming them.
    """
    import asyncio

    from .bodies import read_json_body

    state = server_state()
    llm = state.llm
    if not hasattr(llm, "re_isq"):
        raise NotSupportedError("re-quantizing the loaded model (/v1/re_isq) is not available yet: in-situ "
                                "quantization (ISQ) is not supported by this build")
    body = await read_json_body()
    requested = body.get("isq_type", body.get("ggml_type")) if isinstance(body, dict) else None
    if isinstance(requested, bool) or not isinstance(requested, (str, int)):
        raise APIError(400, 'send the ISQ type to apply as a JSON object such as {"isq_type": "Q4K"} '
                            "(a mistral.rs ISQ name like Q4K, Q8_0 or HQQ4, or a bit count)", param="isq_type")
    new_type = await asyncio.to_thread(llm.re_isq, requested)
    return json_response({"object": "re_isq", "model": state.model_name, "isq_type": new_type})


@blueprint.post("/v1/images/generations")
async def image_generations() -> Response:
    raise NotSupportedError("image generation (/v1/images/generations) is not available: this server runs text "
                            "models only (mistral.rs serves it with diffusion models)")
