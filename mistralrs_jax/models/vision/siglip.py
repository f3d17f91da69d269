"""The SigLIP vision encoder of Idefics2 (HF `Idefics2VisionTransformer` weights), in Flax nnx.

Idefics2 feeds images at their own aspect ratio (NaViT-style): an image of h x w patches is
embedded (the stride-p convolution, as one matmul over flattened p x p patches), and each
patch takes the learned position embedding of the cell its fractional (row, col) coordinate
falls in on the checkpoint's square `image_size / patch_size` grid. Pre-norm encoder layers
(bidirectional attention, fc1 -> gelu-tanh -> fc2) and a post-LayerNorm follow.

To compile one program for every image size, each image's patches are laid out row by row and
padded to the grid's full length (`num_positions`), with a patch mask: padded patches are
never attended to (transformers' `patch_attention_mask`), so their rows are garbage the
connector masks out again. Masked keys add nothing to a softmax, so this equals transformers'
per-image (unpadded) result and its padded-batch result alike. Patch positions and the mask
are computed on the host (`patchify`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...errors import ModelLoadError, NotSupportedError
from ..layers import LayerNorm, Linear
from .clip import check_vit_config, vision_activation, vit_config_fields


@dataclass(frozen=True)
class SiglipVisionConfig:
    """HF `Idefics2VisionConfig`; the defaults are transformers'."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str) -> "SiglipVisionConfig":
        config = cls(**vit_config_fields(raw, cls()))
        check_vit_config(config, source)
        return config

    @property
    def grid(self) -> int:
        """Position-embedding cells per side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid


def patch_position_ids(rows: int, cols: int, grid: int) -> np.ndarray:
    """[rows * cols] position ids of an image's patches: each patch's fractional coordinate
    (i / rows, j / cols, in f32 as transformers computes it) bucketed on the grid x grid table."""
    boundaries = (np.arange(1, grid, dtype=np.float64) / grid).astype(np.float32)

    def buckets(count: int) -> np.ndarray:
        step = np.float32(1.0) / np.float32(count)
        fractional = np.minimum(np.arange(count, dtype=np.float32) * step, np.float32(1.0 - 1e-6))
        return np.searchsorted(boundaries, fractional, side="right")

    return (buckets(rows)[:, None] * grid + buckets(cols)[None, :]).reshape(-1)


def patchify(pixels: np.ndarray, config: SiglipVisionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """f32 [C, H, W] -> (patches [num_positions, C*p*p], position ids [num_positions], mask [num_positions]).

    Pixels past the last whole patch are dropped (as the valid-padding convolution does)."""
    p, grid = config.patch_size, config.grid
    channels, height, width = pixels.shape
    rows, cols = height // p, width // p
    if rows * cols > config.num_positions or rows == 0 or cols == 0:
        raise NotSupportedError(f"an image of {height}x{width} pixels makes {rows}x{cols} patches, which the "
                                f"{grid}x{grid} vision encoder cannot take")
    cut = pixels[:, :rows * p, :cols * p].reshape(channels, rows, p, cols, p)
    flat = cut.transpose(1, 3, 0, 2, 4).reshape(rows * cols, channels * p * p)
    patches = np.zeros((config.num_positions, channels * p * p), np.float32)
    patches[:rows * cols] = flat
    positions = np.zeros(config.num_positions, np.int32)
    positions[:rows * cols] = patch_position_ids(rows, cols, grid)
    mask = np.zeros(config.num_positions, bool)
    mask[:rows * cols] = True
    return patches, positions, mask


def masked_attention(q, k, v, key_mask, scale: float):
    """q [B, H, Q, D], k/v [B, H, K, D], key_mask [B, K] -> [B, H, Q, D]; softmax in f32."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * jnp.float32(scale)
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


class SiglipAttention(nnx.Module):
    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, out_proj: Linear, num_heads: int):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads = num_heads

    def __call__(self, x, mask):
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(y):
            return y.reshape(batch, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        out = masked_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask,
                               head_dim ** -0.5)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, width))


class SiglipEncoderLayer(nnx.Module):
    """x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x))))."""

    def __init__(self, layer_norm1: LayerNorm, self_attn: SiglipAttention, layer_norm2: LayerNorm, fc1: Linear,
                 fc2: Linear, act: str):
        self.layer_norm1, self.self_attn, self.layer_norm2 = layer_norm1, self_attn, layer_norm2
        self.fc1, self.fc2 = fc1, fc2
        self.act = act

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.fc2(vision_activation(self.act)(self.fc1(self.layer_norm2(x))))


class SiglipVisionEncoder(nnx.Module):
    """(patches [N, L, C*p*p], position ids [N, L], mask [N, L]) -> last hidden state [N, L, hidden]."""

    def __init__(self, config: SiglipVisionConfig, patch_weight: np.ndarray, patch_bias: np.ndarray,
                 position_embedding: np.ndarray, layers: list[SiglipEncoderLayer], post_layernorm: LayerNorm,
                 dtype=jnp.float32):
        # The convolution [hidden, C, p, p] as a matmul over flattened patches: [C * p * p, hidden].
        self.patch_weight = nnx.Param(jnp.asarray(patch_weight.reshape(patch_weight.shape[0], -1).T, dtype=dtype))
        self.patch_bias = nnx.Param(jnp.asarray(patch_bias, jnp.float32))
        self.position_embedding = nnx.Param(jnp.asarray(position_embedding, jnp.float32))
        self.layers = nnx.List(layers)
        self.post_layernorm = post_layernorm
        self.config = config

    def __call__(self, patches, position_ids, mask):
        hidden = patches.astype(jnp.float32) @ self.patch_weight[...].astype(jnp.float32) + self.patch_bias[...]
        hidden = hidden + jnp.take(self.position_embedding[...], position_ids, axis=0)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.post_layernorm(hidden)


def build_siglip_encoder(config: SiglipVisionConfig, source, prefix: str, dtype=jnp.float32) -> SiglipVisionEncoder:
    """The encoder from a WeightSource whose vision tensors sit under `prefix` (e.g. "model.vision_model.")."""
    eps = config.layer_norm_eps
    layers = []
    for i in range(config.num_layers):
        at = f"{prefix}encoder.layers.{i}."
        attention = SiglipAttention(*(source.linear(at + "self_attn." + name)
                                      for name in ("q_proj", "k_proj", "v_proj", "out_proj")), config.num_heads)
        layers.append(SiglipEncoderLayer(source.layer_norm(at + "layer_norm1", eps), attention,
                                         source.layer_norm(at + "layer_norm2", eps), source.linear(at + "mlp.fc1"),
                                         source.linear(at + "mlp.fc2"), config.hidden_act))
    position = source.array(prefix + "embeddings.position_embedding.weight")
    if position.shape[0] != config.num_positions:
        raise ModelLoadError(f"{source.path}: the vision position embedding has {position.shape[0]} rows, but "
                             f"image_size {config.image_size} / patch_size {config.patch_size} needs "
                             f"{config.num_positions}")
    return SiglipVisionEncoder(config, source.array(prefix + "embeddings.patch_embedding.weight"),
                               source.array(prefix + "embeddings.patch_embedding.bias"), position, layers,
                               source.layer_norm(prefix + "post_layernorm", eps), dtype=dtype)
