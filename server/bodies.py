"""Reading JSON request bodies and writing JSON / SSE responses (shared by the routes)."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator

from quart import Response, g, request

from .errors import APIError
from .sse import SSE_HEADERS


async def read_json_body() -> Any:
    """The decoded JSON body; a 400 if it is not JSON (a 413 if too large, raised by Quart)."""
    data = await request.get_data(cache=False)
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send JSON", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        detail = "it is empty" if not data.strip() else f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json") from None
    g.exchange.params = body
    return body


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status=status, content_type="application/json")


def sse_response(chunks: AsyncIterator[bytes]) -> Response:
    response = Response(chunks, status=200, headers=SSE_HEADERS)
    response.timeout = None  # a stream lasts as long as generation does (Quart's default cuts at 60 s)
    g.exchange.deferred = True  # the generator writes the request-log line when the stream ends
    return response


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
