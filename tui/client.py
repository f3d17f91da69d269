"""The dashboard's HTTP side: poll a server's status and stream chat replies from it.

The dashboard talks to every server, its own in-process one included, only through HTTP,
so what it shows is what any client of that server could see.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx

from .view import DashboardView, build_view, parse_prometheus

POLL_TIMEOUT_S = 5.0


@dataclass
class ChatSettings:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256


@dataclass
class StreamEvent:
    """One piece of a streamed reply: text, and on the last event the finish reason and usage."""

    text: str = ""
    request_id: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None


class ServerError(Exception):
    """The server refused a request; the message is its own error message."""


class ServerClient:
    def __init__(self, url: str, api_key: str | None = None):
        base = url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Two clients: a slow chat stream must never hold up a status poll.
        self._poll = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=POLL_TIMEOUT_S)
        self._chat = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(None, connect=10.0))

    async def close(self) -> None:
        await self._poll.aclose()
        await self._chat.aclose()

    async def poll(self) -> DashboardView:
        """One reading of /v1/status and /metrics; an unreachable server gives a view with `error` set."""
        status: dict[str, Any] | None = None
        prometheus: dict[str, float] | None = None
        errors = []
        try:
            response = await self._poll.get("/v1/status")
            if response.status_code == 200:
                status = response.json()
            else:
                errors.append(f"/v1/status: HTTP {response.status_code}")
            response = await self._poll.get("/metrics")
            if response.status_code == 200:
                prometheus = parse_prometheus(response.text)
            else:
                errors.append(f"/metrics: HTTP {response.status_code}")
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        return build_view(status, prometheus, error="; ".join(errors) or None)

    async def model_id(self) -> str:
        response = await self._poll.get("/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
        return models[0]["id"] if models else "default"

    async def stream_chat(self, messages: list[dict[str, str]], settings: ChatSettings,
                          model: str = "default") -> AsyncIterator[StreamEvent]:
        """Stream a chat completion (OpenAI SSE); raises ServerError with the server's message on refusal."""
        body = {"model": model, "messages": messages, "stream": True, "temperature": settings.temperature,
                "top_p": settings.top_p, "max_tokens": settings.max_tokens,
                "stream_options": {"include_usage": True}}
        async with self._chat.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise ServerError(_error_message((await response.aread()).decode("utf-8", "replace"),
                                                 response.status_code))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise ServerError(_error_message(payload, 500))
                event = StreamEvent(request_id=chunk.get("id"))
                for choice in chunk.get("choices") or []:
                    event.text += (choice.get("delta") or {}).get("content") or ""
                    event.finish_reason = choice.get("finish_reason") or event.finish_reason
                if chunk.get("usage"):
                    event.completion_tokens = chunk["usage"].get("completion_tokens")
                yield event


def _error_message(body: str, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:300]}"
