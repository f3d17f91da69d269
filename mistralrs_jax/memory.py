"""Memory of the process the engine runs in: accelerator memory where JAX reports it, else RSS.

JAX's `Device.memory_stats()` answers on GPUs (bytes in use, limit, peak) and returns None
on the CPU backend; there the honest number is the process's resident set size (weights,
KV cache and everything else live in ordinary host memory).

Read inside the engine's own process: the server reports it in /v1/status, the TUI's
in-process mode reads it directly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeviceMemory:
    name: str
    bytes_in_use: int
    bytes_limit: int | None = None
    peak_bytes_in_use: int | None = None


@dataclass
class MemoryReading:
    """`kind` says what was measured: "device" (JAX memory_stats) or "process RSS"."""

    kind: str
    source: str  # where the numbers come from, shown as the panel's label
    devices: list[DeviceMemory] = field(default_factory=list)
    rss_bytes: int | None = None
    host_total_bytes: int | None = None

    @classmethod
    def from_dict(cls, body: dict[str, Any], source: str) -> "MemoryReading":
        """Read the JSON shape `as_dict()` writes (the shape proposed for /v1/status's `memory`)."""
        devices = [DeviceMemory(str(d.get("name", "?")), int(d.get("bytes_in_use") or 0), d.get("bytes_limit"),
                                d.get("peak_bytes_in_use")) for d in body.get("devices") or []]
        return cls(kind=str(body.get("kind", "unknown")), source=source, devices=devices,
                   rss_bytes=body.get("rss_bytes"), host_total_bytes=body.get("host_total_bytes"))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rss_bytes": self.rss_bytes, "host_total_bytes": self.host_total_bytes,
                "devices": [vars(d) for d in self.devices]}


def read_local_memory() -> MemoryReading:
    """This process: JAX device memory if any device reports it, else RSS (psutil)."""
    import psutil

    devices: list[DeviceMemory] = []
    jax = sys.modules.get("jax")  # only if the engine already started JAX here; never start it for a reading
    if jax is not None:
        for device in jax.local_devices():  # a multi-host run lists other processes' devices too
            stats = device.memory_stats()
            if stats:
                devices.append(DeviceMemory(f"{device.platform}:{device.id} {device.device_kind}",
                                            int(stats.get("bytes_in_use", 0)), stats.get("bytes_limit"),
                                            stats.get("peak_bytes_in_use")))
    process = psutil.Process()
    reading = MemoryReading(kind="device" if devices else "process RSS", source="this process", devices=devices,
                            rss_bytes=process.memory_info().rss, host_total_bytes=psutil.virtual_memory().total)
    return reading


def available_bytes() -> int:
    """Memory the process can still take without swapping (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


def ensure_fits(needed: int, what: str, avoid: str) -> None:
    """Raise InsufficientMemoryError before allocating `needed` bytes that are not available.

    `what` says what the bytes are for, `avoid` how to do without them (a flag)."""
    from .errors import InsufficientMemoryError

    available = available_bytes()
    if needed > available:
        raise InsufficientMemoryError(f"{what} needs {needed:,} bytes ({needed / 2**30:.2f} GiB) but only "
                                      f"{available:,} bytes ({available / 2**30:.2f} GiB) are available; {avoid}")


def weight_bytes(model) -> int:
    """Bytes a model's parameters occupy as held (packed blocks at their own size, dense
    weights at their dtype, embeddings, norms, biases)."""
    import jax
    from flax import nnx

    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
