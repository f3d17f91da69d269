"""The tensor-parallel mesh and the checks made before a model loads onto it.

`make_mesh(N, devices=None)` builds a one-axis `Mesh` named "tp" over N devices: by default
`jax.devices()[:N]`, which under `jax.distributed` lists every process's devices (a
multi-host caller may pass its own list). `check_divisible(config, N)` refuses, with a
`TensorParallelError`, a model whose heads, KV heads, MLP width or vocabulary cannot be
split N ways: query heads, MLP width and vocabulary must divide by N; KV heads must divide
by N, or divide N (then each KV head is replicated on N / kv_heads devices, as vLLM does).
While tracing, the model code asks `active_tp_size()` (the runner calls its jitted step inside
`jax.set_mesh`, via `bind_mesh`); `host_staging` keeps a model that is about to be split in
host memory instead of whole on the first accelerator.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ..errors import TensorParallelError

TP_AXIS = "tp"


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A Mesh of `tensor_parallel_size` devices along the axis "tp" (GSPMD-style, Auto axis)."""
    n = tensor_parallel_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TensorParallelError(f"tensor_parallel_size (-tp) must be a positive integer, got {n!r}")
    available = list(jax.devices()) if devices is None else list(devices)
    if len(available) < n:
        raise TensorParallelError(
            f"tensor_parallel_size (-tp) {n} needs {n} devices, but only {len(available)} "
            f"({jax.default_backend()}) are visible; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "before starting")
    return Mesh(np.array(available[:n]), (TP_AXIS,), axis_types=(AxisType.Auto,))


def effective_kv_heads(num_kv_heads: int, tensor_parallel_size: int) -> int:
    """KV heads as held across the mesh: fewer than N are replicated up to N (one per device)."""
    return max(num_kv_heads, tensor_parallel_size)


def check_divisible(config, tensor_parallel_size: int) -> None:
    """Raise TensorParallelError naming every dimension of `config` (a ModelConfig) that
    cannot be split `tensor_parallel_size` ways. Call before any weight loads."""
    n = tensor_parallel_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TensorParallelError(f"tensor_parallel_size (-tp) must be a positive integer, got {n!r}")
    if n == 1:
        return
    problems = []
    for name, value in (("num_attention_heads", config.num_heads), ("intermediate_size", config.intermediate_size),
                        ("vocab_size", config.vocab_size)):
        if value % n:
            problems.append(f"{name} {value} is not divisible by {n}")
    kv = config.num_kv_heads
    if kv % n and n % kv:
        problems.append(f"num_key_value_heads {kv} neither divides by {n} nor divides {n} (KV heads are split, or "
                        f"replicated when there are fewer than devices)")
    if problems:
        usable = [d for d in range(1, 2 * n + 1) if _divides(config, d)]
        raise TensorParallelError(
            f"{config.arch} cannot be split over tensor_parallel_size (-tp) {n}: " + "; ".join(problems)
            + f" (sizes that divide: {', '.join(map(str, usable))})")


def _divides(config, n: int) -> bool:
    kv = config.num_kv_heads
    return (config.num_heads % n == 0 and config.intermediate_size % n == 0 and config.vocab_size % n == 0
            and (kv % n == 0 or n % kv == 0))


def active_tp_size() -> int:
    """The size of the "tp" axis of the mesh set while tracing (`jax.set_mesh`), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or TP_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[TP_AXIS])



class MeshBound:
    """A jitted function called (and lowered) with `mesh` set (`jax.set_mesh`), so the model
    code sees the tp axis while tracing and every call hits the same compiled program."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)


def bind_mesh(fn, mesh):
    """`fn` itself without a mesh, else a MeshBound."""
    return fn if mesh is None else MeshBound(fn, mesh)


def host_staging(tensor_parallel_size: int):
    """A context in which new arrays land in host memory (the CPU backend) rather than on the
    first accelerator: a model split over N devices may not fit one of them whole, so it is
    built on the host and each device then receives only its shards (rules.shard_state).
    A no-op for one device, on the CPU backend, or where JAX has no CPU backend."""
    import contextlib

    if tensor_parallel_size == 1 or jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:
        return contextlib.nullcontext()
    return jax.default_device(host)
