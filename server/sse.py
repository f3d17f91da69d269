"""Server-sent events as OpenAI streams them: `data: {json}` blocks, then `data: [DONE]`."""
from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"

# Streaming responses must not be cached or buffered by a proxy (nginx honours X-Accel-Buffering).
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
