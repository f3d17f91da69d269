"""Building blocks shared by the model families: Linear, norms, embeddings, rotary embeddings.

`Linear` is the one place that decides how a weight is held (design rule 7):
- dense: an f32 (or bf16/f16) matrix [in, out], multiplied directly. XLA:CPU's only fast
  dot is f32, so this is the CPU default (GGUF blocks are dequantized once at load).
- affine int8 blocks: q int8 [out, in] with a scale and an offset per group of `group`
  input columns (w = q * scale + offset). Every GGUF block format with a per-(sub)block
  scale/min is exactly representable so. Dequantized inside the jitted matmul: ~4x less
  weight memory, slower on XLA:CPU; on GPU the Pallas kernel reads these blocks directly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Linear(nnx.Module):
    def __init__(
        self,
        weight: np.ndarray | None = None,  # [in, out]
        *,
        q: np.ndarray | None = None,  # int8 [out, in]
        scale: np.ndarray | None = None,  # [out, in // group]
        offset: np.ndarray | None = None,  # [out, in // group] or None (symmetric formats)
        group: int = 32,
        bias: np.ndarray | None = None,
        dtype=jnp.float32,
    ):
        self.quantized = q is not None
        self.group = group
        if self.quantized:
            self.q = nnx.Param(jnp.asarray(q, dtype=jnp.int8))
            self.scale = nnx.Param(jnp.asarray(scale, dtype=jnp.float32))
            self.offset = nnx.Param(jnp.asarray(offset, dtype=jnp.float32)) if offset is not None else None
            self.in_features = int(q.shape[1])
            self.out_features = int(q.shape[0])
        else:
            self.weight = nnx.Param(jnp.asarray(weight, dtype=dtype))
            self.in_features, self.out_features = (int(d) for d in weight.shape)
        self.bias = nnx.Param(jnp.asarray(bias, dtype=jnp.float32)) if bias is not None else None

    def dense_weight(self) -> jax.Array:
        """The weight as f32 [in, out] (dequantized inside the jit when held as blocks)."""
        if not self.quantized:
            return self.weight[...].astype(jnp.float32)
        out_f, in_f = self.q.shape
        blocks = self.q[...].reshape(out_f, in_f // self.group, self.group).astype(jnp.float32)
        w = blocks * self.scale[...][..., None]
        if self.offset is not None:
            w = w + self.offset[...][..., None]
        return w.reshape(out_f, in_f).T

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantized:
            from pallas_kernels.quant_matmul import affine_int8_matmul

            y = affine_int8_matmul(x, self.q[...], self.scale[...], None if self.offset is None else self.offset[...], self.group)
        else:
            y = x @ self.weight[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    def __init__(self, weight: np.ndarray, eps: float, offset: float = 0.0):
        # Gemma stores (weight - 1); `offset` adds it back at load time, not per step.
        self.weight = nnx.Param(jnp.asarray(np.asarray(weight, np.float32) + offset))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(variance + self.eps) * self.weight[...]).astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, table: np.ndarray, dtype=jnp.float32):
        self.table = nnx.Param(jnp.asarray(table, dtype=dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], ids, axis=0).astype(jnp.float32)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied lm_head: logits = x @ table.T."""
        return jax.lax.dot_general(x, self.table[...].astype(x.dtype), (((1,), (1,)), ((), ())))


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies, with HF's `rope_scaling` variants applied on the host once."""
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if not scaling:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_mid, mid, scaled)
    elif kind in (None, "default", "none"):
        pass
    else:
        from ..errors import NotSupportedError

        raise NotSupportedError(f"rope scaling type {kind!r} is not supported yet")
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, rotary_dim: int) -> jax.Array:
    """NEOX/HF-style rotary embedding (rotate halves) on the first `rotary_dim` dims.

    x: [T, heads, head_dim]; positions: [T].
    """
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, rot/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if rest.shape[-1] == 0:
        return rotated
    return jnp.concatenate([rotated, rest], axis=-1)
