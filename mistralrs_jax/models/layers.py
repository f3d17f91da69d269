"""Building blocks shared by the model families: Linear, norms, embeddings, MLPs, rotary embeddings.

`Linear` is the one place that decides how a weight is held (design rule 7):
- dense: a float matrix [in, out] (f32 on CPU, the checkpoint's half dtype on GPU), for float
  sources, or GGUF blocks dequantized on request (`--cpu-weights f32`);
- packed: a quantized projection at its format's own bits per weight, uint8 [out, row_bytes]
  (the GGUF file's blocks, or what ISQ wrote; mistralrs_jax/quant/packed.py), multiplied by
  `pallas_kernels.quant_matmul`, which picks the kernel per backend (CPU FFI kernel, Pallas on
  GPU, else an XLA reference). On a GPU the activations go in as bf16.

Norms and activations compute in f32 whatever the weight dtype. Rotary embeddings follow HF's
"rotate halves" layout and its `rope_scaling` variants (linear, llama3, yarn, longrope).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..quant.packed import PackedWeight
from .lora_layers import LoraStack, current_scalings


class Linear(nnx.Module):
    # Set by parallel/rules.py under tensor parallelism: "column" (output rows split) or "row"
    # (input split); a packed weight then multiplies per shard (parallel/shard_ops.py).
    tp_role: str | None = None

    def __init__(
        self,
        weight: np.ndarray | None = None,  # [in, out]
        *,
        packed: PackedWeight | None = None,
        bias: np.ndarray | None = None,
        dtype=jnp.float32,
    ):
        self.quantized = packed is not None
        if packed is not None:
            self.blocks = nnx.Param(jnp.asarray(packed.blocks, dtype=jnp.uint8))
            self.qtype = packed.qtype
            self.in_features, self.out_features = packed.in_features, packed.out_features
        else:
            self.weight = nnx.Param(jnp.asarray(weight, dtype=dtype))
            self.in_features, self.out_features = (int(d) for d in weight.shape)
        self.bias = nnx.Param(jnp.asarray(bias, dtype=jnp.float32)) if bias is not None else None
        # Unmerged adapters (models/lora_layers.py): added while an `adapter_scalings` context is set.
        self.lora: LoraStack | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the weight (and bias) occupy as held."""
        held = self.blocks[...] if self.quantized else self.weight[...]
        return int(held.nbytes) + (int(self.bias[...].nbytes) if self.bias is not None else 0)

    def packed(self) -> PackedWeight:
        """The packed weight, copied to the host (ISQ cache, tests)."""
        return PackedWeight(np.asarray(self.blocks[...]), self.qtype, self.in_features)

    def dense_weight(self) -> jax.Array:
        """The weight as f32 [in, out] (dequantized inside the jit when packed)."""
        if not self.quantized:
            return self.weight[...].astype(jnp.float32)
        from pallas_kernels.quant_matmul import dequantize_blocks

        return dequantize_blocks(self.blocks[...], self.qtype).T

    def __call__(self, x: jax.Array) -> jax.Array:
        adapter_input = x
        if self.quantized:
            from ..parallel.shard_ops import quant_matmul_per_shard

            if jax.default_backend() == "gpu":
                x = x.astype(jnp.bfloat16)  # tensor-core inputs; the kernel accumulates in f32
            y = quant_matmul_per_shard(x, self.blocks[...], self.qtype, self.tp_role)
        else:
            y = x @ self.weight[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora is not None and (scalings := current_scalings()) is not None:
            y = y + self.lora(adapter_input, scalings).astype(y.dtype)
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
    """Token embedding table [vocab, hidden], also the tied lm_head. Held dense, or packed (a
    GGUF table kept at the file's bits): a lookup then dequantizes only the rows it takes, and
    the tied lm_head is a quantized matmul."""

    tp_role: str | None = None  # "column" under tensor parallelism: the vocab rows are split

    def __init__(self, table: np.ndarray | None = None, dtype=jnp.float32, *, packed: PackedWeight | None = None):
        self.quantized = packed is not None
        if packed is not None:
            self.blocks = nnx.Param(jnp.asarray(packed.blocks, dtype=jnp.uint8))
            self.qtype = packed.qtype
        else:
            self.table = nnx.Param(jnp.asarray(table, dtype=dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.quantized:
            from pallas_kernels.quant_matmul import dequantize_blocks

            return dequantize_blocks(jnp.take(self.blocks[...], ids, axis=0), self.qtype)
        return jnp.take(self.table[...], ids, axis=0).astype(jnp.float32)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied lm_head: logits = x @ table.T."""
        if self.quantized:
            from ..parallel.shard_ops import quant_matmul_per_shard

            if jax.default_backend() == "gpu":
                x = x.astype(jnp.bfloat16)
            return quant_matmul_per_shard(x, self.blocks[...], self.qtype, self.tp_role)
        return jax.lax.dot_general(x, self.table[...].astype(x.dtype), (((1,), (1,)), ((), ())))


class LayerNorm(nnx.Module):
    """Mean-centred LayerNorm with weight and bias (Phi-2, Starcoder2)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, eps: float):
        self.weight = nnx.Param(jnp.asarray(np.asarray(weight, np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.asarray(bias, np.float32))) if bias is not None else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(variance + self.eps) * self.weight[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


# HF `hidden_act` names -> functions. "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" are all
# the tanh approximation; plain "gelu" is the exact erf form (Gemma's configs say "gelu" but
# mean the tanh form: its config loader rewrites the name before it gets here).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        from ..errors import NotSupportedError

        raise NotSupportedError(f"activation {name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})")


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (llama) or GeGLU (gemma). A fused `gate_up` weight
    (Phi-3) holds the gate rows first, then the up rows."""

    def __init__(self, down: Linear, act: str, *, gate: Linear | None = None, up: Linear | None = None,
                 gate_up: Linear | None = None):
        self.gate_proj, self.up_proj, self.gate_up_proj, self.down_proj = gate, up, gate_up, down
        self.act = act

    def __call__(self, x):
        if self.gate_up_proj is not None:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(activation(self.act)(gate) * up)


class PlainMLP(nnx.Module):
    """down(act(up(x))) with biases (Phi-2's fc1/fc2, Starcoder2's c_fc/c_proj)."""

    def __init__(self, up: Linear, down: Linear, act: str):
        self.up_proj, self.down_proj = up, down
        self.act = act

    def __call__(self, x):
        return self.down_proj(activation(self.act)(self.up_proj(x)))


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies with HF's `rope_scaling` variants (linear, llama3, yarn), on the host once.

    longrope is not a fixed set of frequencies (it switches with the position): see
    `RotaryEmbedding.from_config`.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if not scaling:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling.get("factor", 1.0) or 1.0)
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
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, rotary_dim, theta, factor, scaling)
    elif kind in (None, "default", "none"):
        pass
    else:
        from ..errors import NotSupportedError

        raise NotSupportedError(f"rope scaling type {kind!r} is not supported yet (supported: linear, llama3, yarn, "
                                "longrope)")
    return inv_freq.astype(np.float32)


def _yarn_inv_freq(inv_freq: np.ndarray, dim: int, theta: float, factor: float, scaling: dict) -> np.ndarray:
    """YaRN (arXiv:2309.00071): interpolate the low frequencies, keep the high ones, ramp between."""
    original = float(scaling.get("original_max_position_embeddings") or 4096)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 -> the original (extrapolated) frequency, 0 -> interpolated by `factor`
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep


def rope_attention_factor(scaling: dict | None, max_position_embeddings: int) -> float:
    """The factor HF multiplies cos/sin with (YaRN's and LongRoPE's attention temperature)."""
    if not scaling:
        return 1.0
    kind = scaling.get("rope_type") or scaling.get("type")
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if kind == "yarn":
        factor = float(scaling.get("factor") or 1.0)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            return mscale(factor, float(scaling["mscale"])) / mscale(factor, float(scaling["mscale_all_dim"]))
        return mscale(factor)
    if kind in ("longrope", "su"):
        original = float(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or max_position_embeddings / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, rotary_dim: int,
               attention_factor: float = 1.0) -> jax.Array:
    """NEOX/HF-style rotary embedding (rotate halves) on the first `rotary_dim` dims.

    x: [T, heads, head_dim]; positions: [T]; inv_freq: [rot/2] or per token [T, rot/2].
    """
    if inv_freq.ndim == 1:
        inv_freq = inv_freq[None, :]
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, rot/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if rest.shape[-1] == 0:
        return rotated
    return jnp.concatenate([rotated, rest], axis=-1)


class RotaryEmbedding(nnx.Module):
    """Rotary position embedding of one attention kind (models with local and global layers hold two).

    LongRoPE (Phi-3) holds two frequency sets: HF uses the long set for a forward pass whose
    sequence reaches past `original_max_position_embeddings`, and keeps the keys it cached
    before. Here each step's tokens use the set their sequence's furthest position in the
    step calls for: the same as HF for a whole prompt and for every decode step; only a
    prompt split into chunks across that boundary differs (its early chunks use the short set).
    """

    def __init__(self, inv_freq: np.ndarray, rotary_dim: int, *, attention_factor: float = 1.0,
                 long_inv_freq: np.ndarray | None = None, long_from_position: int | None = None):
        self.inv_freq = nnx.Variable(jnp.asarray(inv_freq, jnp.float32))
        self.long_inv_freq = (nnx.Variable(jnp.asarray(long_inv_freq, jnp.float32)) if long_inv_freq is not None
                              else None)
        self.long_from_position = long_from_position
        self.rotary_dim = rotary_dim
        self.attention_factor = float(attention_factor)

    @classmethod
    def from_config(cls, rotary_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int,
                    freq_factors: dict[str, np.ndarray] | None = None) -> "RotaryEmbedding":
        """`freq_factors` are GGUF's precomputed divisors of the base frequencies: "freqs" (llama3
        `rope_freqs`), or "short"/"long" (LongRoPE `rope_factors_short/long`)."""
        freq_factors = freq_factors or {}
        scaling = scaling or {}
        kind = scaling.get("rope_type") or scaling.get("type")
        factor_kw = {"attention_factor": rope_attention_factor(scaling, max_position_embeddings)}
        short = freq_factors.get("short", scaling.get("short_factor"))
        long = freq_factors.get("long", scaling.get("long_factor"))
        if kind in ("longrope", "su") or short is not None:
            base = rope_inv_freq(rotary_dim, theta, None).astype(np.float64)
            if short is None or long is None:  # a LongRoPE config without factors: plain frequencies
                return cls(base.astype(np.float32), rotary_dim, **factor_kw)
            original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
            return cls((base / np.asarray(short, np.float64)).astype(np.float32), rotary_dim,
                       long_inv_freq=(base / np.asarray(long, np.float64)).astype(np.float32),
                       long_from_position=original, **factor_kw)
        if "freqs" in freq_factors:  # llama3-style scaling baked into per-frequency divisors
            base = rope_inv_freq(rotary_dim, theta, None).astype(np.float64)
            return cls((base / np.asarray(freq_factors["freqs"], np.float64)).astype(np.float32), rotary_dim,
                       **factor_kw)
        return cls(rope_inv_freq(rotary_dim, theta, scaling or None), rotary_dim, **factor_kw)

    def __call__(self, x: jax.Array, meta) -> jax.Array:
        """x [T, heads, head_dim]; `meta` is the step's AttentionMetadata (positions, token rows)."""
        inv_freq = self.inv_freq[...]
        if self.long_inv_freq is not None:
            # HF picks the set from the sequence length the forward pass reaches, so every
            # token of a sequence uses its sequence's largest position in this step.
            rows = meta.block_tables.shape[0]
            reach = jax.ops.segment_max(meta.positions, meta.token_seq, num_segments=rows)[meta.token_seq]
            use_long = (reach >= self.long_from_position)[:, None]
            inv_freq = jnp.where(use_long, self.long_inv_freq[...][None, :], inv_freq[None, :])
        return apply_rope(x, meta.positions, inv_freq, self.rotary_dim, self.attention_factor)
