"""The Quart application: an OpenAI-compatible API over one `LLM`.

    app = create_app(llm, api_key="secret", request_log="requests.jsonl")
    serve(llm, args)          # what `mistralrs-server` runs (hypercorn on --host/--port)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/ID], GET /health,
GET /metrics (Prometheus), GET /v1/status (JSON for dashboards), GET /openapi.json, and POST /v1/re_isq,
POST /v1/images/generations (400 until the features behind them exist).
With an API key, every route but /health and /openapi.json (and CORS preflights) needs
`Authorization: Bearer KEY`. In front of the app, `limits.Admission` bounds the queue (503 when
full), drains on shutdown and times out streams nobody reads.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
from typing import Any

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from .errors import APIError, register_error_handlers
from .limits import DEFAULT_MAX_WAITING, DEFAULT_SHUTDOWN_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S, Admission
from .openapi import build_openapi
from .prometheus import EngineCollector, make_registry
from .request_log import Exchange, RequestLog
from .routes_admin import blueprint as admin_blueprint
from .routes_chat import blueprint as chat_blueprint
from .routes_completions import blueprint as completions_blueprint
from .routes_loras import blueprint as loras_blueprint
from .state import ServerState

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any text prompt a context window holds
OPEN_ROUTES = ("/health", "/openapi.json")  # answer without the API key, so load balancers can probe
UNLOGGED_ROUTES = ("/health", "/metrics", "/v1/status")  # polled by monitors: not worth a log line each


def create_app(llm: Any, *, api_key: str | None = None, request_log: str | None = None,
               model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               truncate_sequence: bool = False, default_seed: int | None = None,
               allowed_local_media_path: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
               stream_write_timeout: float | None = DEFAULT_WRITE_TIMEOUT_S) -> Quart:
    """A Quart app serving `llm` (a `mistralrs_jax.LLM`). `model_name` defaults to `llm.model_name`.
    `max_waiting`: generation requests queued beyond the engine's max_seqs before a 503;
    `stream_write_timeout`: seconds a response write may wait on a client that does not read."""
    app = Quart("mistralrs_jax_server")
    app.config.update(MAX_CONTENT_LENGTH=max_body_bytes, RESPONSE_TIMEOUT=None)
    state = ServerState(llm=llm, model_name=model_name or llm.model_name, api_key=api_key or None,
                        request_log=RequestLog(request_log) if request_log else None,
                        truncate_sequence=truncate_sequence, default_seed=default_seed,
                        local_images=allowed_local_media_path or False)
    metrics = getattr(getattr(llm, "engine", None), "metrics", None)
    state.metrics_registry = make_registry(EngineCollector(
        llm.metrics, state.model_name, lambda: getattr(metrics, "compiles_at_start", None),
        lambda: dict(state.http_responses)))
    if hasattr(getattr(llm, "engine", None), "replicas"):  # --data-parallel-size: per-replica load too
        state.metrics_registry.register(ReplicaCollector(llm.engine.stats, state.model_name))
    app.extensions["mistralrs"] = state
    for blueprint in (chat_blueprint, completions_blueprint, admin_blueprint, loras_blueprint):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    app.asgi_app = Admission(app.asgi_app, state, max_waiting=max_waiting,  # type: ignore[method-assign]
                             write_timeout=stream_write_timeout)
    app.extensions["mistralrs_admission"] = app.asgi_app
    openapi = build_openapi(model_name=state.model_name)

    @app.get("/openapi.json")
    async def _openapi() -> Response:
        return Response(json.dumps(openapi), status=200, content_type="application/json")

    @app.before_request
    async def _open_exchange() -> None:
        g.exchange = Exchange(method=request.method, route=request.path)
        if state.api_key is None or request.path in OPEN_ROUTES or request.method == "OPTIONS":
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer YOUR_KEY` "
                                "with the key the server was started with (--api-key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.after_request
    async def _close_exchange(response: Response) -> Response:
        # mistral.rs answers any origin (permissive CORS), so browser front-ends can call it.
        response.headers.setdefault("Access-Control-Allow-Origin", "*")
        response.headers.setdefault("Access-Control-Allow-Headers", "Authorization, Content-Type")
        response.headers.setdefault("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        route = request.url_rule.rule if request.url_rule is not None else "(unknown)"
        state.count_response(route, response.status_code)
        if response.status_code >= 400 and response.status_code not in (408, 413):
            await _drain_body()
        exchange: Exchange | None = g.get("exchange")
        if exchange is None or exchange.deferred:
            return response
        exchange.status = response.status_code
        if exchange.error is None and response.status_code >= 400:
            exchange.error = _error_message(await response.get_data(as_text=True))
        if state.request_log is not None and request.path not in UNLOGGED_ROUTES:
            state.request_log.write(exchange)
        return response

    @app.after_serving
    async def _close_log() -> None:
        if state.request_log is not None:
            state.request_log.close()

    return app


async def _drain_body() -> None:
    """Read what is left of a request body an error answered before the route read it (404, 405, 401).
    HTTP/1.1 keep-alive needs the whole request consumed: unread, the server would close the
    connection and the client's next request on it would fail with "server disconnected"."""
    try:
        await request.get_data(cache=False)
    except HTTPException:  # too large or too slow: the connection closes, as it must
        pass


class ReplicaCollector:
    """/metrics rows per data-parallel replica (parallel/replicas.py), labelled replica="i"."""

    def __init__(self, stats: Any, model_name: str):
        self._stats, self._model = stats, model_name

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        rows = self._stats().get("replicas", [])
        for key, doc in (("num_running", "sequences running"), ("num_waiting", "sequences waiting"),
                         ("load", "unfinished sequences routed to the replica"),
                         ("requests_routed", "requests routed to the replica"),
                         ("kv_blocks_free", "free KV cache blocks")):
            family = GaugeMetricFamily(f"mistralrs_replica_{key}", f"{doc}, per data-parallel replica",
                                       labels=["model", "replica"])
            for row in rows:
                family.add_metric([self._model, str(row["replica"])], float(row.get(key) or 0))
            yield family


def _error_message(body: str) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:500]


def serve(llm: Any, args: argparse.Namespace) -> None:
    """Serve `llm` over HTTP with the command-line settings in `args` until SIGINT/SIGTERM."""
    from .serving import run_until_signal

    multi_host = getattr(llm, "distributed", None)
    if multi_host is not None and not multi_host.is_leader:
        log.info("process %d of %d: process 0 serves HTTP; this one runs its steps", multi_host.process_id,
                 multi_host.num_processes)
        multi_host.follow()
        return
    request_log = getattr(args, "request_log_file", None) or getattr(args, "request_logging_file", None)
    app = create_app(llm, api_key=getattr(args, "api_key", None), request_log=request_log,
                     truncate_sequence=bool(getattr(args, "truncate_sequence", False)),
                     default_seed=getattr(args, "seed", None),
                     allowed_local_media_path=getattr(args, "allowed_local_media_path", None),
                     max_body_bytes=getattr(args, "max_body_bytes", None) or DEFAULT_MAX_BODY_BYTES,
                     max_waiting=_setting(args, "max_waiting", DEFAULT_MAX_WAITING),
                     stream_write_timeout=_setting(args, "stream_write_timeout", DEFAULT_WRITE_TIMEOUT_S))
    run_until_signal(app, args.host, args.port, model_name=app.extensions["mistralrs"].model_name,
                     shutdown_timeout=_setting(args, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_S))


def _setting(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value
