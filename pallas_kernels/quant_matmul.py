"""Matmul with weights held as affine int8 blocks (w = q * scale + offset per group of columns).

`affine_int8_matmul` is the public entry; `dispatch()` picks the Pallas GPU kernel when one
is available (the Pallas issue) and the pure-JAX reference otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def affine_int8_matmul_reference(x, q, scale, offset, group: int):
    """x [T, in] @ dequant(q [out, in]).T -> [T, out], dequantizing inside the jit."""
    out_f, in_f = q.shape
    w = q.reshape(out_f, in_f // group, group).astype(jnp.float32) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    w = w.reshape(out_f, in_f)
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((1,), (1,)), ((), ())))


def dispatch() -> str:
    """Which implementation `affine_int8_matmul` uses: 'pallas', 'pallas-interpret' or 'reference'.

    'pallas' is the kernel in quant_matmul_pallas.py compiled through Pallas' Triton
    lowering (no Mosaic GPU kernel yet). MISTRALRS_JAX_QMATMUL=reference|pallas|interpret
    overrides the default (Pallas on GPU, the XLA reference elsewhere). Read on every
    call, i.e. at trace time.
    """
    from ._compat import choose_implementation

    return choose_implementation("MISTRALRS_JAX_QMATMUL", jax.default_backend() == "gpu" and _pallas_available())


def _pallas_available() -> bool:
    from ._compat import triton_available

    return triton_available()


def affine_int8_matmul(x, q, scale, offset, group: int, *, impl: str | None = None):
    """x [T, in] @ dequant(q).T -> [T, out] f32; `impl` (a `dispatch()` value) overrides the choice."""
    impl = impl or dispatch()
    if impl == "reference":
        return affine_int8_matmul_reference(x, q, scale, offset, group)
    from .quant_matmul_pallas import affine_int8_matmul_pallas, triton_supports

    if impl == "pallas" and not triton_supports(q.shape[0], q.shape[1], group):
        return affine_int8_matmul_reference(x, q, scale, offset, group)
    return affine_int8_matmul_pallas(x, q, scale, offset, group, interpret=impl == "pallas-interpret")
