"""The text of each dashboard panel, rendered from a `DashboardView` (rich Text, no widgets)."""
from __future__ import annotations

from rich.text import Text

from .memory import MemoryReading, format_bytes
from .view import DashboardView

BAR_WIDTH = 24


def _number(value: int | float | None, fmt: str = "{}") -> str:
    return "—" if value is None else fmt.format(value)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def scheduler_text(view: DashboardView) -> Text:
    text = Text()
    if not view.reachable:
        text.append("server unreachable", style="bold red")
        if view.error:
            text.append(f"\n{view.error}", style="red")
        return text
    text.append("waiting ")
    text.append(_number(view.waiting), style="bold")
    text.append("   running ")
    text.append(_number(view.running), style="bold green" if view.running else "bold")
    text.append("   preempted (total) ")
    text.append(_number(view.preempted_total), style="bold yellow" if view.preempted_total else "bold")
    text.append(f"\nrequests: {_number(view.requests_total)} received, {_number(view.requests_finished)} finished, "
                f"{_number(view.requests_aborted)} aborted")
    if view.error:
        text.append(f"\n{view.error}", style="yellow")
    return text


def kv_cache_text(view: DashboardView) -> Text:
    text = Text()
    if view.kv_blocks_total:
        used = view.kv_blocks_used
        if used is None:
            used = view.kv_blocks_total - (view.kv_blocks_free or 0)
        fraction = used / view.kv_blocks_total
        text.append(bar(fraction), style="magenta")
        text.append(f" {fraction:.0%}\n")
        text.append(f"blocks used {used} / {view.kv_blocks_total}, free {_number(view.kv_blocks_free)}")
        if view.block_size:
            text.append(f"  ({view.block_size} tokens each, {view.kv_blocks_total * view.block_size} token slots)")
    else:
        text.append("KV cache: not reported by the server", style="dim")
    rate = view.prefix_hit_rate
    text.append("\nprefix cache: ")
    if rate is None:
        text.append("no lookups yet" if view.prefix_cache_queries == 0 else "not reported", style="dim")
    else:
        text.append(f"{rate:.1%} hit rate", style="bold")
        text.append(f" ({view.prefix_cache_hits} of {view.prefix_cache_queries} prompt blocks)")
    return text


def mesh_text(per_device: list[dict] | None) -> Text:
    """One row per device of a tensor-parallel mesh: the weights and KV cache it holds (and its
    memory in use where the backend reports it); empty for a single device."""
    text = Text()
    if not per_device or len(per_device) < 2:
        return text
    text.append(f"\ntensor parallel over {len(per_device)} devices\n", style="italic")
    for row in per_device:
        text.append(f"{row.get('device')}: weights {format_bytes(row.get('weight_bytes'))}, "
                    f"KV {format_bytes(row.get('kv_cache_bytes'))}")
        if row.get("bytes_in_use") is not None:
            text.append(f", in use {format_bytes(row['bytes_in_use'])} / {format_bytes(row.get('bytes_limit'))}")
        text.append("\n")
    text.rstrip()
    return text


def memory_text(reading: MemoryReading | None, mesh_devices: list[dict] | None = None) -> Text:
    text = _memory_text(reading)
    return text.append_text(mesh_text(mesh_devices)) if mesh_devices else text


def _memory_text(reading: MemoryReading | None) -> Text:
    text = Text()
    if reading is None:
        text.append("not reported by the server (its /v1/status has no \"memory\")", style="dim")
        return text
    if reading.devices:
        text.append(f"device memory (JAX memory_stats, {reading.source})\n", style="italic")
        for device in reading.devices:
            if device.bytes_limit:
                text.append(bar(device.bytes_in_use / device.bytes_limit), style="cyan")
                text.append(" ")
            text.append(f"{device.name}: {format_bytes(device.bytes_in_use)} / {format_bytes(device.bytes_limit)}")
            if device.peak_bytes_in_use is not None:
                text.append(f", peak {format_bytes(device.peak_bytes_in_use)}")
            text.append("\n")
        if reading.rss_bytes is not None:
            text.append(f"host RSS {format_bytes(reading.rss_bytes)}")
        text.rstrip()
        return text
    text.append(f"process RSS (CPU backend: JAX reports no device memory; {reading.source})\n", style="italic")
    if reading.rss_bytes is not None and reading.host_total_bytes:
        text.append(bar(reading.rss_bytes / reading.host_total_bytes), style="cyan")
        text.append(f" {format_bytes(reading.rss_bytes)} of {format_bytes(reading.host_total_bytes)} host memory")
    else:
        text.append(f"{format_bytes(reading.rss_bytes)}")
    return text


def compile_text(view: DashboardView) -> Text:
    text = Text()
    text.append("XLA compiles: ")
    text.append(_number(view.compiles), style="bold")
    if view.compiles_after_warmup is not None:
        text.append("   after warm-up: ")
        text.append(str(view.compiles_after_warmup),
                    style="bold red" if view.compiles_after_warmup else "bold green")
    return text


def rate_label(name: str, series: list[float]) -> str:
    current = series[-1] if series else 0.0
    peak = max(series) if series else 0.0
    return f"{name + ':':<12}{current:8.1f} tok/s   (peak {peak:.1f} over the last {len(series)} polls)"
