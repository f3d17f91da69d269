"""A CPU matmul on raw GGML blocks, called from inside jitted code through XLA's FFI.

    y = quant_matmul_cpu(x, w, qtype, K)      # x f32 (T, K), w uint8 (N, row_bytes) -> f32 (T, N)

`w` holds each output row's GGUF blocks exactly as the file stores them (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS, and Q8_1 / Q8_K, which ISQ can write; `qtype` is
gguf-py's GGMLQuantizationType id), or this project's HQQ4/HQQ8 blocks (quant/hqq.py; ids in
`blocks.HQQ_TYPE_IDS`). `type_id(name)` gives the id of a format name.
Activations are quantized to 8 bits exactly as llama.cpp's CPU backend quantizes them for the
weight type (Q8_0, Q8_1 or Q8_K blocks, activations.h) and dotted with the weight codes in
integers, so each output is ggml's vec_dot up to the order of f32 roundings; the formats ggml
cannot multiply (Q8_1 and Q8_K weights, HQQ) take Q8_0 blocks (qmatmul.cc's act_kind says why).
See qmatmul.cc for the arithmetic and the error it implies.

The kernel is C++ with AVX2 / AVX-512 VNNI intrinsics against XLA's FFI headers (the route
JAX documents), compiled with the system's g++ at first use and cached (build.py), so
`pip install -e .` needs no build step. Plain loops (Numba or C) do not vectorize this
integer work, and explicit SIMD is worth ~10x here; intrinsics also give the VNNI
u8 x s8 dot product and byte shuffles directly. Where it cannot be built or loaded, `cpu_kernel_available()`
is False and one log line says why; callers then use the XLA reference.
Set ``MISTRALRS_JAX_CPU_KERNEL=off`` to disable it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import NamedTuple

import numpy as np

from ...errors import NotSupportedError
from .blocks import HQQ_TYPE_IDS, LAYOUTS
from .build import KernelBuildError, library_path

log = logging.getLogger(__name__)

# kernel type ids -> (elements per block, bytes per block)
_FORMATS: dict[int, tuple[int, int]] = {t: (block, nbytes) for t, (block, nbytes, _) in LAYOUTS.items()}


class Kernel(NamedTuple):
    isa: str  # the instruction set the library was compiled for, as it reports it
    target: str  # the FFI target name registered with jax
    lib: ctypes.CDLL
    attention_target: str  # the paged attention's FFI target (attention.h)


@functools.lru_cache(maxsize=None)
def load_kernel(isa: str = "native") -> Kernel:
    """Build (or find in the cache), load and register the kernel; raises KernelBuildError."""
    import jax

    path = library_path(isa)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"cannot load {path}: {e}") from e
    lib.mj_isa.restype = ctypes.c_char_p
    lib.mj_supports.argtypes = [ctypes.c_int64]
    lib.mj_pool_threads.restype = ctypes.c_int64
    target = f"mistralrs_jax_qmatmul_{isa.replace('+', '_')}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.MjQuantMatmul), platform="cpu")
    attention_target = f"mistralrs_jax_paged_attention_{isa.replace('+', '_')}"
    jax.ffi.register_ffi_target(attention_target, jax.ffi.pycapsule(lib.MjPagedAttention), platform="cpu")
    kernel = Kernel(lib.mj_isa().decode(), target, lib, attention_target)
    missing = [t for t in _FORMATS if not lib.mj_supports(t)]
    if missing:
        raise KernelBuildError(f"{path} lacks types {missing}: a stale build")
    log.debug("CPU quantized-matmul kernel loaded: %s (%s)", path, kernel.isa)
    return kernel


@functools.lru_cache(maxsize=1)
def _default_kernel() -> Kernel | None:
    if os.environ.get("MISTRALRS_JAX_CPU_KERNEL", "").lower() in ("0", "off", "false", "no"):
        log.warning("CPU quantized-matmul kernel disabled by MISTRALRS_JAX_CPU_KERNEL; using the XLA reference")
        return None
    try:
        return load_kernel("native")
    except KernelBuildError as e:
        log.warning("CPU quantized-matmul kernel unavailable, using the XLA reference: %s", e)
        return None


def cpu_kernel_available() -> bool:
    """True where the kernel is built and loaded (the first call may compile it, ~3 s)."""
    return _default_kernel() is not None


def supported_types() -> set[int]:
    """Type ids the kernel takes (empty where it is unavailable): gguf-py's
    GGMLQuantizationType ids, and HQQ_TYPE_IDS."""
    return set(_FORMATS) if cpu_kernel_available() else set()


def type_id(qtype: str) -> int | None:
    """The kernel's id of a packed format name (`PackedWeight.qtype`), None for a name it has no id for."""
    if qtype in HQQ_TYPE_IDS:
        return HQQ_TYPE_IDS[qtype]
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[qtype])
    except KeyError:
        return None


def row_bytes(qtype: int, K: int) -> int:
    """Bytes of one output row of K weights in format `qtype`."""
    block, nbytes = _FORMATS[qtype]
    return K // block * nbytes


def quant_matmul_cpu(x, w, qtype: int, K: int, *, kernel: Kernel | None = None):
    """x (..., K) @ dequantize(w).T -> f32 (..., N); callable inside jax.jit.

    w: uint8 (N, K // block * bytes_per_block), the GGUF blocks of each output row.
    """
    import jax
    import jax.numpy as jnp

    qtype = int(qtype)
    if qtype not in _FORMATS:
        raise NotSupportedError(
            f"the CPU kernel has no GGML type {qtype}; it takes {sorted(_FORMATS)} (gguf-py GGMLQuantizationType "
            f"ids, and {HQQ_TYPE_IDS})"
        )
    block, nbytes = _FORMATS[qtype]
    if K % block:
        raise ValueError(f"K={K} is not a multiple of the type's {block}-element blocks")
    if w.ndim != 2 or w.dtype != np.uint8 or w.shape[1] != K // block * nbytes:
        raise ValueError(
            f"w must be uint8 (N, {K // block * nbytes}) for K={K} and type {qtype}; got {w.dtype} {tuple(w.shape)}"
        )
    if x.shape[-1] != K:
        raise ValueError(f"x's last axis is {x.shape[-1]}, expected K={K}")
    if kernel is None:
        kernel = _default_kernel()
        if kernel is None:
            raise NotSupportedError("the CPU quantized-matmul kernel is unavailable here (see the log); use the XLA path")
    lead = x.shape[:-1]
    x2 = jnp.reshape(jnp.asarray(x, jnp.float32), (-1, K))
    out = jax.ffi.ffi_call(kernel.target, jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.float32))(
        x2, w, qtype=np.int64(qtype), k=np.int64(K)
    )
    return jnp.reshape(out, (*lead, w.shape[0]))


def paged_attention_cpu(q, k_cache, v_cache, block_tables, token_seq, positions, num_rows, *, block_size: int,
                        window: int | None = None, soft_cap: float | None = None, kernel: Kernel | None = None):
    """The softmax sums of every query row over its paged context (decodes and prefill chunks
    alike), reading the cache in place (attention.h); callable inside jax.jit. q f32
    [N, kvh, G, D] (already scaled), k/v_cache f32 [slots, kvh, D], block_tables i32
    [S, blocks], token_seq i32 [N] (each row's sequence row), positions i32 [N]; rows from
    `num_rows` on get zeros. Returns (l [N, kvh, G], acc [N, kvh, G, D]), the un-normalized sums
    the reference paths of pallas_kernels/paged_attention.py return."""
    import jax
    import jax.numpy as jnp

    kernel = kernel or _default_kernel()
    if kernel is None:
        raise NotSupportedError("the CPU kernel library is unavailable here (see the log); use the XLA path")
    n, kvh, group, head_dim = q.shape
    out = (jax.ShapeDtypeStruct((n, kvh, group), jnp.float32), jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return jax.ffi.ffi_call(kernel.attention_target, out)(
        q, k_cache, v_cache, jnp.asarray(block_tables, jnp.int32), jnp.asarray(token_seq, jnp.int32),
        jnp.asarray(positions, jnp.int32), jnp.reshape(jnp.asarray(num_rows, jnp.int32), (1,)),
        block_size=np.int64(block_size), window=np.int64(window or 0), soft_cap=np.float32(soft_cap or 0.0))


__all__ = [
    "Kernel",
    "KernelBuildError",
    "cpu_kernel_available",
    "load_kernel",
    "paged_attention_cpu",
    "quant_matmul_cpu",
    "row_bytes",
    "supported_types",
    "type_id",
]
