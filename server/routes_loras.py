"""`/v1/loras`: per-request LoRA adapters (`--lora-mode dynamic`) loaded and removed while serving.

- `GET /v1/loras` lists the loaded adapters (name, slot, rank, path).
- `POST /v1/loras` `{"name": ..., "path": <PEFT directory or Hub id>, "weight": 1.0}` loads one into a
  free slot: 201 with its card; 409 when every slot is taken or the name is loaded already; 400
  for a bad directory, a rank above `--max-lora-rank`, or modules the model cannot adapt.
- `DELETE /v1/loras/NAME` removes one: from then on requests naming it get a 404, while
  requests already running with it finish with it; its slot is reused only after they have.

Adapters are selected per request by the model name `base:adapter` or the `lora` field. The
slots have fixed shapes, so none of this compiles anything (loading/adapters/unmerged.py).

POST makes the server read the directory (or fetch the Hub repo) the client names, with the
server's own file access and token: expose these routes only behind `--api-key`.
"""
from __future__ import annotations

import asyncio

from quart import Blueprint, Response

from mistralrs_jax.errors import MistralRsError, NotSupportedError

from .bodies import json_response, read_json_body
from .errors import APIError
from .schemas import LoraLoadRequest, parse_request
from .state import server_state

blueprint = Blueprint("loras", __name__)


def _slots():
    state = server_state()
    if getattr(state.llm, "adapter_slots", None) is None:
        raise NotSupportedError("per-request LoRA adapters (/v1/loras) need a server started with --lora-mode dynamic")
    return state.llm


def _card(adapter) -> dict:
    return {**adapter.card(), "model": f"{server_state().model_name}:{adapter.name}"}


@blueprint.get("/v1/loras")
async def list_loras() -> Response:
    llm = _slots()
    return json_response({"object": "list", "max_loras": llm.adapter_slots.num_slots,
                          "max_lora_rank": llm.adapter_slots.held.max_rank,
                          "data": [_card(a) for a in llm.loras()]})


@blueprint.post("/v1/loras")
async def load_lora() -> Response:
    body = await read_json_body()  # read first: a refusal must not leave the body on the connection
    llm = _slots()
    req: LoraLoadRequest = parse_request(LoraLoadRequest, body)
    try:
        adapter = await asyncio.to_thread(llm.load_lora, req.name, req.path, req.weight)
    except MistralRsError as exc:
        error = APIError.from_engine(exc)
        if error.status == 500:  # a directory that is not a usable adapter (ModelLoadError): the client's input
            error = APIError(400, str(exc), param="path", code="invalid_adapter")
        raise error from None
    return json_response(_card(adapter), status=201)


# (The variable is named as /v1/models/<path:model_id>'s: what tests/test_openapi.py maps to OpenAPI.)
@blueprint.delete("/v1/loras/<path:model_id>")
async def unload_lora(model_id: str) -> Response:
    llm = _slots()
    adapter = llm.unload_lora(model_id)
    return json_response({"id": adapter.name, "object": "lora", "deleted": True,
                          "running_requests": adapter.in_use()})
