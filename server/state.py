"""What every route needs: the engine, the served model's names, and server settings."""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from quart import current_app

from .errors import APIError
from .request_log import RequestLog

# mistral.rs answers requests that name "default" (or no model) with its default model.
DEFAULT_MODEL_ALIAS = "default"


@dataclass
class ServerState:
    llm: Any  # mistralrs_jax.LLM (typed loosely: the server only uses its public surface)
    model_name: str
    api_key: str | None = None
    request_log: RequestLog | None = None
    truncate_sequence: bool = False
    default_seed: int | None = None
    # Image paths / file:// URLs a client may make the server read: False (none) or a directory.
    local_images: bool | str = False
    created: int = field(default_factory=lambda: int(time.time()))
    started_monotonic: float = field(default_factory=time.monotonic)
    metrics_registry: Any = None  # prometheus_client registry behind /metrics
    # (route, status) -> count, for /metrics.
    http_responses: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def engine(self) -> Any:
        """The engine interface (mistralrs_jax.engine.engine.Engine): add_request, abort, stats(),
        limits, config, is_alive(). Routes use it, never the engine's scheduler or runner."""
        return self.llm.engine

    def check_model(self, requested: str | None) -> None:
        if requested is None or requested in (self.model_name, DEFAULT_MODEL_ALIAS):
            return
        base, sep, adapter = requested.rpartition(":")
        if sep and base in (self.model_name, DEFAULT_MODEL_ALIAS) and self.lora_names() is not None:
            self.llm.resolve_lora(adapter, param="model")  # a 404 naming the loaded adapters when unknown
            return
        raise APIError(404, f"the model {requested!r} does not exist on this server; it serves "
                            f"{self.model_name!r} (\"default\" also selects it, see GET /v1/models)",
                       param="model", code="model_not_found")

    def lora_names(self) -> list[str] | None:
        """Loaded per-request LoRA adapters (--lora-mode dynamic), or None when the model has none."""
        slots = getattr(self.llm, "adapter_slots", None)
        return None if slots is None else slots.names()

    def with_lora(self, params: Any, requested_model: str | None, lora: str | None) -> Any:
        """`params` with the adapter a request selects: its `lora` field, or a model named
        `base:adapter`. Both must agree when both are given; unknown adapters are a 404."""
        from_model = None
        if requested_model and requested_model not in (self.model_name, DEFAULT_MODEL_ALIAS):
            from_model = requested_model.rpartition(":")[2]
        if lora is not None and from_model is not None and lora != from_model:
            raise APIError(400, f"the model {requested_model!r} selects the adapter {from_model!r} but the lora field "
                                f"names {lora!r}; send one of them", param="lora", code="lora_conflict")
        name = lora if lora is not None else from_model
        if name is None:
            return params
        adapter = self.llm.resolve_lora(name, param="lora" if lora is not None else "model")
        return dataclasses.replace(params, lora=adapter)

    def count_response(self, route: str, status: int) -> None:
        with self._lock:
            self.http_responses[(route, status)] += 1

    @property
    def context_len(self) -> int:
        """Tokens a sequence may hold (prompt + output): the model length, or the KV pool if smaller."""
        return self.engine.limits.context_len


def server_state() -> ServerState:
    return current_app.extensions["mistralrs"]
