"""Data-parallel replicas (issue 15, part 3): D engines on disjoint device groups behind one server.

`--data-parallel-size D` (`LLM(data_parallel_size=D)`) builds D engines from one loaded model,
each on its own group of `-tp` devices (`device_groups`): its own copy of the weights, its own
KV cache, scheduler and prefix cache. `ReplicaSet` stands where the one engine stood (the engine
interface the LLM and the server use): a request goes to the replica with the fewest unfinished
sequences routed to it (its running plus waiting ones, counted here as they are handed over, so
a burst spreads before any replica's loop has seen it; ties go to the replica given the fewest
requests so far). Its stats are the replicas' summed, plus a "replicas" list of per-replica load
(/v1/status, /metrics).

A prefix is cached only by the replica that ran it; routing by load, not by prefix, means a
repeated prompt may land on a replica that has not seen it (it is then cached there too).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

from ..errors import NotSupportedError

# Snapshot keys that describe the engine's shape rather than add up over replicas.
SHARED_KEYS = frozenset({"block_size", "step_shapes_compiled", "step_shapes_total", "compiles", "uptime_s"})
# Per-replica load rows: these snapshot keys, per replica.
REPLICA_KEYS = ("num_running", "num_waiting", "requests_total", "requests_finished", "kv_blocks_total",
                "kv_blocks_free", "prefix_cache_hits", "prefix_cache_queries", "generation_tokens_total", "steps_total")


def device_groups(data_parallel_size: int, tensor_parallel_size: int = 1, devices=None) -> list[list]:
    """`data_parallel_size` disjoint groups of `tensor_parallel_size` devices, in device order, from
    `devices` (default: this process's devices)."""
    import jax

    d, tp = data_parallel_size, tensor_parallel_size
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise NotSupportedError(f"data_parallel_size (--data-parallel-size) must be a positive integer, got {d!r}")
    available = list(jax.local_devices()) if devices is None else list(devices)
    if len(available) < d * tp:
        raise NotSupportedError(
            f"data_parallel_size (--data-parallel-size) {d} x tensor_parallel_size (-tp) {tp} needs {d * tp} devices, "
            f"but only {len(available)} ({jax.default_backend()}) are visible; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={d * tp} before starting")
    return [available[i * tp:(i + 1) * tp] for i in range(d)]


def check_data_parallel(data_parallel_size: int, speculative: bool, dynamic_lora: bool, multi_process: bool) -> None:
    """Refuse, before anything loads, what replicas cannot be combined with yet."""
    if data_parallel_size == 1:
        return
    for what, present in (("a draft model (speculative decoding)", speculative),
                          ("per-request (dynamic) LoRA", dynamic_lora),
                          ("several processes (--num-processes)", multi_process)):
        if present:
            raise NotSupportedError(f"data_parallel_size (--data-parallel-size) > 1 cannot be combined with {what} yet")


def merge_snapshots(snapshots: list[dict]) -> dict:
    """One metrics snapshot for several engines: numbers summed (shape keys taken from the first),
    flags or-ed, histograms merged bucket by bucket, lists concatenated (rows tagged "replica")."""
    merged: dict = {}
    for key, first in snapshots[0].items():
        values = [snap.get(key) for snap in snapshots]
        if key in SHARED_KEYS:
            merged[key] = max(values) if key == "uptime_s" else first
        elif isinstance(first, bool):
            merged[key] = any(values)
        elif isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            merged[key] = sum(values)
        elif isinstance(first, dict) and "cumulative_counts" in first:
            merged[key] = {**first, "cumulative_counts": [sum(c) for c in zip(*(v["cumulative_counts"] for v in values))],
                           "sum": sum(v["sum"] for v in values), "count": sum(v["count"] for v in values)}
        elif isinstance(first, list):
            merged[key] = [{**row, "replica": i} if isinstance(row, dict) else row
                           for i, value in enumerate(values) for row in (value or [])]
        else:
            merged[key] = first
    return merged


class _Metrics:
    """What readers take of `Engine.metrics` (the compile count baseline), across replicas."""

    def __init__(self, replicas: list):
        self._replicas = replicas

    @property
    def compiles_at_start(self) -> int:
        return max(engine.metrics.compiles_at_start for engine in self._replicas)

    @compiles_at_start.setter
    def compiles_at_start(self, value: int) -> None:
        for engine in self._replicas:
            engine.metrics.compiles_at_start = value

    def snapshot(self) -> dict:
        return merge_snapshots([engine.metrics.snapshot() for engine in self._replicas])


class _Runners:
    """`ReplicaSet.runner`: replica 0's runner for what any one answers (score, buckets), and the
    mesh report of all of them (/v1/status)."""

    def __init__(self, replicas: list):
        self._replicas = replicas

    def mesh_report(self) -> dict:
        reports = [engine.runner.mesh_report() for engine in self._replicas]
        return {**reports[0], "data_parallel_size": len(reports),
                "devices": [d for report in reports for d in report["devices"]],
                "per_device": [row for report in reports for row in report["per_device"]],
                "replicas": [{"replica": i, **report} for i, report in enumerate(reports)]}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_replicas":
            raise AttributeError(name)
        return getattr(self._replicas[0].runner, name)


class ReplicaSet:
    """D engines behind the one-engine interface (see the module docstring)."""

    def __init__(self, replicas: list, groups: list[list]):
        if len(replicas) != len(groups) or not replicas:
            raise ValueError("one device group per replica")
        self.replicas = list(replicas)
        self.device_groups = [[str(device) for device in group] for group in groups]
        self.metrics = _Metrics(self.replicas)
        self.runner = _Runners(self.replicas)
        self._lock = threading.Lock()
        self._live: list[list] = [[] for _ in self.replicas]  # unfinished handles routed to each replica
        self._routed = [0] * len(self.replicas)  # requests given to each replica so far

    # -- routing ---------------------------------------------------------------------------

    def loads(self) -> list[int]:
        """Unfinished sequences routed to each replica (running plus waiting)."""
        with self._lock:
            for handles in self._live:
                handles[:] = [h for h in handles if not h.finished]
            return [sum(h.n for h in handles) for handles in self._live]

    def add_request(self, *args, **kwargs):
        with self._lock:
            for handles in self._live:
                handles[:] = [h for h in handles if not h.finished]
            loads = [sum(h.n for h in handles) for handles in self._live]
            index = min(range(len(self.replicas)), key=lambda i: (loads[i], self._routed[i], i))
            handle = self.replicas[index].add_request(*args, **kwargs)
            self._live[index].append(handle)
            self._routed[index] += 1
        return handle

    def abort(self, request_id: str) -> None:
        for engine in self.replicas:  # an id a replica does not hold is nothing to it
            engine.abort(request_id)

    # -- one answer for all ------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params) -> None:
        self.replicas[0].validate(prompt_token_ids, params)

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        self.replicas[0].check_prompt_fits(num_prompt_tokens)

    def score(self, token_ids: list[int], multimodal=None):
        return self.replicas[0].score(token_ids, multimodal=multimodal)

    @property
    def limits(self):
        """Replica 0's limits, with the sequences in flight and KV blocks of all of them."""
        limits = [engine.limits for engine in self.replicas]
        return dataclasses.replace(limits[0], max_seqs=sum(lim.max_seqs for lim in limits),
                                   kv_blocks_total=sum(lim.kv_blocks_total for lim in limits))

    def __getattr__(self, name: str) -> Any:
        # config, block_manager, scheduler, tokenizer, constraints, vocab_size: replica 0's (all are alike)
        if name.startswith("__") or name == "replicas":
            raise AttributeError(name)
        return getattr(self.replicas[0], name)

    def mesh_report(self) -> dict:
        """Every replica's devices (`_Runners.mesh_report`), not replica 0's alone."""
        return self.runner.mesh_report()

    def stats(self) -> dict:
        snapshots = [engine.stats() for engine in self.replicas]
        merged = merge_snapshots(snapshots)
        merged["compiles_after_warmup"] = merged["compiles"] - self.metrics.compiles_at_start
        loads = self.loads()
        with self._lock:
            routed = list(self._routed)
        merged["data_parallel_size"] = len(self.replicas)
        merged["replicas"] = [{"replica": i, "devices": self.device_groups[i], "load": loads[i],
                               "requests_routed": routed[i], **{k: snap.get(k) for k in REPLICA_KEYS}}
                              for i, snap in enumerate(snapshots)]
        return merged

    # -- every replica -----------------------------------------------------------------------

    def warmup(self, progress: Callable | None = None, background: bool = False) -> None:
        count = len(self.replicas)
        for i, engine in enumerate(self.replicas):
            engine.warmup(None if progress is None else
                          lambda done, total, shape, i=i: progress(i * total + done, count * total, shape),
                          background=background)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        return all([engine.wait_compiled(timeout) for engine in self.replicas])

    def start(self) -> None:
        for engine in self.replicas:
            engine.start()

    def shutdown(self) -> None:
        for engine in self.replicas:
            engine.shutdown()

    def is_alive(self) -> bool:
        return all(engine.is_alive() for engine in self.replicas)

    def reset_prefix_cache(self) -> None:
        for engine in self.replicas:
            engine.reset_prefix_cache()

    def swap_weights(self, *args, **kwargs) -> None:
        raise NotSupportedError("re-quantizing (re_isq) is not supported with --data-parallel-size > 1 yet")
