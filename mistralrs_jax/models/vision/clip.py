"""The CLIP ViT vision tower of LLaVA-style models (HF `CLIPVisionModel` weights), in Flax nnx.

pixels [N, 3, H, W] -> patch embedding (the stride-p convolution, as one matmul over the
flattened p x p patches) -> class token + learned position embeddings -> pre-LayerNorm ->
pre-norm encoder layers (full bidirectional attention, fc1 -> quick_gelu/gelu -> fc2).

A vision-language model reads the hidden state after one encoder layer (`vision_feature_layer`,
counted as transformers' `hidden_states` tuple: 0 is the pre-LayerNorm output, i the output of
layer i, negative from the end; a list concatenates several), keeping (strategy "full") or
dropping ("default") the class token. Only the layers up to the deepest one read are built, so
LLaVA 1.5 (layer -2 of 24) never loads or runs the last layer, nor the post-LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...errors import ModelLoadError, NotSupportedError
from ..layers import ACTIVATIONS, LayerNorm, Linear

VISION_ACTIVATIONS = {**ACTIVATIONS, "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


def vision_activation(name: str):
    try:
        return VISION_ACTIVATIONS[name]
    except KeyError:
        raise NotSupportedError(f"vision activation {name!r} is not supported "
                                f"(supported: {', '.join(sorted(VISION_ACTIVATIONS))})") from None


def vit_config_fields(raw: dict[str, Any], defaults) -> dict[str, Any]:
    """The ViT hyperparameters Hugging Face vision configs share (CLIP, SigLIP), as our config
    fields; a key that is absent or null takes `defaults`' value."""

    def get(key: str, default):
        value = raw.get(key)
        return default if value is None else value

    return dict(
        hidden_size=int(get("hidden_size", defaults.hidden_size)),
        intermediate_size=int(get("intermediate_size", defaults.intermediate_size)),
        num_layers=int(get("num_hidden_layers", defaults.num_layers)),
        num_heads=int(get("num_attention_heads", defaults.num_heads)),
        num_channels=int(get("num_channels", defaults.num_channels)),
        image_size=int(get("image_size", defaults.image_size)),
        patch_size=int(get("patch_size", defaults.patch_size)),
        hidden_act=str(get("hidden_act", defaults.hidden_act)),
        layer_norm_eps=float(get("layer_norm_eps", defaults.layer_norm_eps)),
    )


def check_vit_config(config, source: str) -> None:
    if config.hidden_size % config.num_heads:
        raise ModelLoadError(f"{source}: vision hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_heads}")
    vision_activation(config.hidden_act)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """HF `CLIPVisionConfig`; the defaults are transformers' (configs may leave any key out)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str) -> "CLIPVisionConfig":
        model_type = raw.get("model_type", "clip_vision_model")
        if model_type not in ("clip_vision_model", "clip"):
            raise NotSupportedError(f"{source}: the vision tower {model_type!r} is not supported (supported: a CLIP "
                                    "ViT, model_type clip_vision_model)")
        config = cls(**vit_config_fields(raw, cls()))
        check_vit_config(config, source)
        if config.image_size % config.patch_size:
            raise ModelLoadError(f"{source}: vision image_size {config.image_size} is not a multiple of patch_size "
                                 f"{config.patch_size}")
        return config

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1  # patches + the class token


def feature_layer_indices(layers: int | list[int], num_layers: int) -> tuple[int, ...]:
    """`vision_feature_layer` as non-negative indices into transformers' hidden_states (num_layers + 1 long)."""
    wanted = [layers] if isinstance(layers, int) else list(layers)
    resolved = []
    for layer in wanted:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ModelLoadError(f"vision_feature_layer {layer} is outside the {num_layers}-layer vision tower")
        resolved.append(index)
    return tuple(resolved)


class CLIPAttention(nnx.Module):
    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, out_proj: Linear, num_heads: int):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads = num_heads

    def __call__(self, x):
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(y):
            return y.reshape(batch, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.float32(head_dim ** -0.5)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, length, width)
        return self.out_proj(out)


class CLIPEncoderLayer(nnx.Module):
    """x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x))))."""

    def __init__(self, layer_norm1: LayerNorm, self_attn: CLIPAttention, layer_norm2: LayerNorm, fc1: Linear,
                 fc2: Linear, act: str):
        self.layer_norm1, self.self_attn, self.layer_norm2 = layer_norm1, self_attn, layer_norm2
        self.fc1, self.fc2 = fc1, fc2
        self.act = act

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(vision_activation(self.act)(self.fc1(self.layer_norm2(x))))


class CLIPVisionTower(nnx.Module):
    """pixels [N, 3, H, W] (H = W = image_size) -> selected features [N, tokens, hidden * len(feature_layers)]."""

    def __init__(self, config: CLIPVisionConfig, patch_weight: np.ndarray, class_embedding: np.ndarray,
                 position_embedding: np.ndarray, pre_layernorm: LayerNorm, layers: list[CLIPEncoderLayer],
                 feature_layers: tuple[int, ...], keep_class_token: bool, dtype=jnp.float32):
        # The convolution [hidden, C, p, p] as a matmul over flattened patches: [C * p * p, hidden].
        self.patch_weight = nnx.Param(jnp.asarray(patch_weight.reshape(patch_weight.shape[0], -1).T, dtype=dtype))
        self.class_embedding = nnx.Param(jnp.asarray(class_embedding, jnp.float32))
        self.position_embedding = nnx.Param(jnp.asarray(position_embedding, jnp.float32))
        self.pre_layrnorm = pre_layernorm
        self.layers = nnx.List(layers)
        self.config = config
        self.feature_layers = feature_layers
        self.keep_class_token = keep_class_token

    @property
    def num_tokens(self) -> int:
        """Feature rows per image."""
        return self.config.grid ** 2 + (1 if self.keep_class_token else 0)

    def embed(self, pixel_values):
        cfg = self.config
        batch, channels, height, width = pixel_values.shape
        p = cfg.patch_size
        patches = pixel_values.astype(jnp.float32).reshape(batch, channels, height // p, p, width // p, p)
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)
        patch_embeds = patches @ self.patch_weight[...].astype(jnp.float32)
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, cfg.hidden_size))
        return jnp.concatenate([cls, patch_embeds], axis=1) + self.position_embedding[...][None]

    def __call__(self, pixel_values):
        hidden = self.pre_layrnorm(self.embed(pixel_values))
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden)
            states.append(hidden)
        selected = [states[i] for i in self.feature_layers]
        if not self.keep_class_token:
            selected = [s[:, 1:] for s in selected]
        return jnp.concatenate(selected, axis=-1) if len(selected) > 1 else selected[0]


def vision_tower_prefix(names, source: str) -> str:
    """Where a checkpoint keeps the CLIP tower: "vision_tower.", "vision_tower.vision_model.",
    "model.vision_tower.vision_model.", ... (found from the patch embedding's name)."""
    suffix = "embeddings.patch_embedding.weight"
    found = sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))
    if not found:
        raise ModelLoadError(f"{source}: no CLIP vision tower weights (*.{suffix}) in the checkpoint")
    return found[0]


def build_clip_vision_tower(config: CLIPVisionConfig, source, prefix: str, feature_layers: tuple[int, ...],
                            keep_class_token: bool, dtype=jnp.float32) -> CLIPVisionTower:
    """The tower from a WeightSource whose CLIP tensors sit under `prefix`; builds layers up to
    the deepest feature layer only."""
    eps = config.layer_norm_eps
    layers = []
    for i in range(max(feature_layers)):
        at = f"{prefix}encoder.layers.{i}."
        attention = CLIPAttention(*(source.linear(at + "self_attn." + name)
                                    for name in ("q_proj", "k_proj", "v_proj", "out_proj")), config.num_heads)
        layers.append(CLIPEncoderLayer(source.layer_norm(at + "layer_norm1", eps), attention,
                                       source.layer_norm(at + "layer_norm2", eps), source.linear(at + "mlp.fc1"),
                                       source.linear(at + "mlp.fc2"), config.hidden_act))
    position = source.array(prefix + "embeddings.position_embedding.weight")
    if position.shape[0] != config.num_positions:
        raise ModelLoadError(f"{source.path}: the vision position embedding has {position.shape[0]} rows, but "
                             f"image_size {config.image_size} / patch_size {config.patch_size} needs "
                             f"{config.num_positions}")
    return CLIPVisionTower(config, source.array(prefix + "embeddings.patch_embedding.weight"),
                           source.array(prefix + "embeddings.class_embedding"), position,
                           source.layer_norm(prefix + "pre_layrnorm", eps), layers, feature_layers, keep_class_token,
                           dtype=dtype)
