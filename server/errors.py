"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause ends here as a 4xx with that body; anything else is a
500 with the same shape (and a logged traceback), so the server keeps serving.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from mistralrs_jax.errors import InvalidRequestError, MistralRsError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_engine(cls, exc: MistralRsError, prompt_param: str | None = None) -> "APIError":
        """The typed engine errors carry their own status, type, param and code. The engine
        names the prompt "prompt" or "messages"; `prompt_param` says which this route calls it."""
        param, code = None, None
        if isinstance(exc, InvalidRequestError):
            param, code = exc.param, exc.code
            if prompt_param is not None and param in ("prompt", "messages"):
                param = prompt_param
        elif exc.http_status == 400:
            code = "not_supported"
        return cls(exc.http_status, str(exc), error_type=exc.error_type, param=param, code=code)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError) -> Response:
    response = Response(json.dumps(error.body(), ensure_ascii=False), status=error.status,
                        content_type="application/json")
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


# HTTP-level failures (routing, method, size) with the message a client can act on.
_HTTP_MESSAGES = {
    404: ("not_found_error", "unknown_url", "no route {method} {path}: the API lives under /v1 "
                                            "(e.g. POST /v1/chat/completions, GET /v1/models)"),
    405: ("invalid_request_error", "method_not_allowed", "{path} does not accept {method}; allowed: {allowed}"),
    408: ("invalid_request_error", "request_timeout", "the request body did not arrive in time"),
    413: ("invalid_request_error", "request_too_large",
          "the request body is larger than the server accepts ({limit} bytes)"),
}


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def _api_error(error: APIError) -> Response:
        return error_response(error)

    @app.errorhandler(MistralRsError)
    async def _engine_error(error: MistralRsError) -> Response:
        return error_response(APIError.from_engine(error))

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        error_type, code, template = _HTTP_MESSAGES.get(
            status, ("invalid_request_error" if status < 500 else "server_error", None, error.description or ""))
        allowed = ", ".join(getattr(error, "valid_methods", None) or [])
        message = template.format(method=request.method, path=request.path, allowed=allowed,
                                  limit=app.config.get("MAX_CONTENT_LENGTH"))
        api_error = APIError(status, message, error_type=error_type, code=code)
        response = error_response(api_error)
        if status == 405 and allowed:
            response.headers["Allow"] = allowed
        return response

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(APIError(500, f"internal server error: {type(error).__name__}: {error}",
                                       error_type="server_error"))
