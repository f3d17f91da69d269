"""Memory readings for the dashboard (the reading itself lives in the engine package, so the
server can report it in /v1/status too)."""
from __future__ import annotations

from mistralrs_jax.memory import DeviceMemory, MemoryReading, read_local_memory  # noqa: F401  (re-export)


def format_bytes(count: float | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
