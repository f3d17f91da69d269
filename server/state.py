"""What every route needs: the engine, the served model's names, and server settings."""
from __future__ import annotations

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
        raise APIError(404, f"the model {requested!r} does not exist on this server; it serves "
                            f"{self.model_name!r} (\"default\" also selects it, see GET /v1/models)",
                       param="model", code="model_not_found")

    def count_response(self, route: str, status: int) -> None:
        with self._lock:
            self.http_responses[(route, status)] += 1

    @property
    def context_len(self) -> int:
        """Tokens a sequence may hold (prompt + output): the model length, or the KV pool if smaller."""
        return self.engine.limits.context_len


def server_state() -> ServerState:
    return current_app.extensions["mistralrs"]
