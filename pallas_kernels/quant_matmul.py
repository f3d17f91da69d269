"""Matmul with packed quantized weights: the one public entry, and the one place that picks an
implementation per backend.

`quant_matmul(x, blocks, qtype)` computes x [..., in] @ dequantize(blocks).T with `blocks`
uint8 [out, row_bytes] in a format of quant_blocks.FORMATS (the GGUF file's own blocks, or
HQQ4/HQQ8). `dispatch(qtype)` chooses:
- 'cpu-kernel' on CPU: the XLA FFI kernel of mistralrs_jax.quant.cpu_kernel (int8 x
  low-bit block dots, activations quantized to 8 bits per block as llama.cpp does), when it
  is built and serves the type;
- 'pallas' on an NVIDIA GPU: the raw-block Pallas kernel (quant_matmul_pallas.py);
- 'reference' elsewhere, and for what neither serves: the blocks are dequantized inside the
  jit with the format's own integer program (quant_blocks.py), then one dot.
MISTRALRS_JAX_QMATMUL=reference|pallas|interpret forces a choice (interpret: the Pallas
kernel in interpret mode, for tests on tiny shapes). Read at trace time.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from .quant_blocks import FORMATS, block_format, dequantize_blocks

log = logging.getLogger(__name__)

ENV_VAR = "MISTRALRS_JAX_QMATMUL"


def quant_matmul_reference(x: jax.Array, blocks: jax.Array, qtype: str) -> jax.Array:
    """x @ dequantize(blocks).T -> f32, the whole weight dequantized inside the jit. With bf16/f16
    activations (GPU) the weight is rounded to them and the dot accumulates in f32."""
    x = jnp.asarray(x)
    w = dequantize_blocks(blocks, qtype)
    if x.dtype in (jnp.bfloat16, jnp.float16):
        w = w.astype(x.dtype)
    else:
        x = x.astype(jnp.float32)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@functools.cache
def _cpu_kernel():
    """(quant_matmul_cpu, the kernel's type id of a format name, its supported ids) or None, logged once."""
    try:
        from mistralrs_jax.quant.cpu_kernel import cpu_kernel_available, quant_matmul_cpu, supported_types, type_id
    except ImportError as exc:
        log.warning("quantized matmul: no CPU kernel module (%s); using the XLA reference (slower)", exc)
        return None
    if not cpu_kernel_available():  # the module logs why
        return None
    return quant_matmul_cpu, type_id, frozenset(int(t) for t in supported_types())


def cpu_kernel_serves(qtype: str) -> bool:
    kernel = _cpu_kernel()
    return kernel is not None and kernel[1](qtype) in kernel[2]


def _pallas_available() -> bool:
    from ._compat import triton_available

    return triton_available()


def dispatch(qtype: str | None = None) -> str:
    """'cpu-kernel', 'pallas', 'pallas-interpret' or 'reference' for a weight of `qtype`
    (None: the choice for the backend, ignoring what a CPU kernel serves)."""
    from ._compat import choose_implementation

    backend = jax.default_backend()
    impl = choose_implementation(ENV_VAR, backend == "gpu" and _pallas_available())
    forced = os.environ.get(ENV_VAR, "").strip()
    if impl == "reference" and not forced and backend == "cpu" and qtype is not None:
        if cpu_kernel_serves(qtype):
            return "cpu-kernel"
        _note_reference(qtype)
    return impl


@functools.cache
def _note_reference(qtype: str) -> None:
    if _cpu_kernel() is not None:
        log.info("quantized matmul: the CPU kernel does not serve %s; its matmuls use the XLA reference (slower)",
                 qtype)


def quant_matmul(x: jax.Array, blocks: jax.Array, qtype: str, *, impl: str | None = None) -> jax.Array:
    """x [..., in] @ dequantize(blocks).T -> [..., out] f32; `impl` (a `dispatch()` value) overrides."""
    impl = impl or dispatch(qtype)
    fmt = block_format(qtype, tuple(blocks.shape))
    if impl == "cpu-kernel":
        quant_matmul_cpu, type_id, _ = _cpu_kernel()
        lead, in_features = x.shape[:-1], x.shape[-1]
        y = quant_matmul_cpu(jnp.asarray(x, jnp.float32).reshape(-1, in_features), blocks, type_id(qtype),
                             in_features)
        return y.reshape(*lead, blocks.shape[0])
    if impl in ("pallas", "pallas-interpret"):
        from .quant_matmul_pallas import quant_matmul_pallas, triton_supports

        if impl == "pallas-interpret" or triton_supports(blocks.shape[0], x.shape[-1], fmt.block_elems):
            return quant_matmul_pallas(x, blocks, qtype, interpret=impl == "pallas-interpret")
    return quant_matmul_reference(x, blocks, qtype)


__all__ = ["FORMATS", "ENV_VAR", "block_format", "cpu_kernel_serves", "dequantize_blocks", "dispatch",
           "quant_matmul", "quant_matmul_reference"]
