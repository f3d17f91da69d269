"""Idefics2 (HF `Idefics2ForConditionalGeneration`): SigLIP encoder, perceiver connector, Mistral LM.

Image side: an image is resized keeping its aspect ratio (longest edge at most
`size.longest_edge`, both edges at least `size.shortest_edge`), rescaled and normalized, and
(with `do_image_splitting`) seen as its four quarters followed by the whole, each resized alike.
Each such crop goes through the SigLIP encoder (siglip.py) at its own size, then the connector:
a gated MLP (`modality_projection`, vision hidden -> text hidden) and a perceiver resampler —
`resampler_n_latents` learned latents that, `resampler_depth` times, cross-attend to the
projected patches together with themselves (RMS-normed, grouped-query heads), then a gated MLP,
and a final RMS norm. So every crop becomes exactly `resampler_n_latents` rows.

Prompt side, as transformers' Idefics2Processor: each `<image>` becomes
`<fake_token_around_image>` + n x `<image>` + `<fake_token_around_image>` (five such runs with
splitting), a doubled fake token (adjacent images) collapses into one, and a word glued to a
closing fake token is re-tokenized with a space before it. The language model is the
checkpoint's text_config (Mistral) through the ordinary engine (models/registry.py reads the
nested `model.text_model.` tensors); image rows replace the `<image>` token embeddings.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...config import ModelConfig
from ...json_files import read_json_object
from ..model_config import config_from_hf, with_generation_eos
from ...errors import CorruptModelFileError, ImageError, ModelLoadError, \
    UnsupportedArchitectureError
from ..layers import GatedMLP, Linear, RMSNorm
from ..weights import WeightSource
from .clip import vision_activation
from .image_processing import PREPROCESSOR_CONFIG_FILE, ImageProcessorConfig, load_image, preprocess_pixels, \
    read_image_processor_config, resize_pixels, rgb_pixels
from .inputs import MultiModalInputs, image_cache_salt
from .llava import TEXT_CONFIG_DEFAULTS, ImageEncoder
from .siglip import SiglipVisionConfig, SiglipVisionEncoder, build_siglip_encoder, masked_attention, patchify

log = logging.getLogger(__name__)

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
PIL_BILINEAR = 2
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# Crops per vision call, padded up to one of these (one image with splitting is five crops).
CROP_BATCH_BUCKETS = (1, 2, 5)


@dataclass(frozen=True)
class PerceiverConfig:
    """HF `Idefics2PerceiverConfig` (hidden size and eps follow the text model's, as transformers forces)."""

    hidden_size: int
    rms_norm_eps: float
    hidden_act: str = "silu"
    n_latents: int = 64
    depth: int = 3
    n_heads: int = 16
    head_dim: int = 96
    num_key_value_heads: int = 4


@dataclass
class Idefics2Config:
    vision: SiglipVisionConfig
    perceiver: PerceiverConfig
    text: ModelConfig
    image_token_id: int

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "Idefics2Config":
        source = os.path.join(model_dir, "config.json")
        raw = read_json_object(source)
        text_raw = dict(raw.get("text_config") or {})
        text_type = text_raw.setdefault("model_type", "mistral")
        text_raw = {**TEXT_CONFIG_DEFAULTS.get(text_type, {}), **text_raw}
        text_raw.pop("architectures", None)
        if "torch_dtype" not in text_raw and "dtype" not in text_raw:
            text_raw["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype")
        text = with_generation_eos(config_from_hf(text_raw, source=source), model_dir)
        vision = SiglipVisionConfig.from_hf(raw.get("vision_config") or {}, source)
        p = raw.get("perceiver_config") or {}
        perceiver = PerceiverConfig(
            hidden_size=text.hidden_size,
            rms_norm_eps=float(p.get("rms_norm_eps", 1e-6)) if int(p.get("hidden_size", 4096)) == text.hidden_size
            else float(text_raw.get("rms_norm_eps", 1e-6)),
            hidden_act=str(p.get("hidden_act", "silu")), n_latents=int(p.get("resampler_n_latents", 64)),
            depth=int(p.get("resampler_depth", 3)), n_heads=int(p.get("resampler_n_heads", 16)),
            head_dim=int(p.get("resampler_head_dim", 96)), num_key_value_heads=int(p.get("num_key_value_heads", 4)))
        vision_activation(perceiver.hidden_act)
        if perceiver.n_heads % perceiver.num_key_value_heads:
            raise ModelLoadError(f"{source}: resampler_n_heads {perceiver.n_heads} is not a multiple of the "
                                 f"perceiver's num_key_value_heads {perceiver.num_key_value_heads}")
        return cls(vision=vision, perceiver=perceiver, text=text,
                   image_token_id=int(raw.get("image_token_id", raw.get("image_token_index", 32001))))


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Idefics2ImageProcessor:
    """The fields of Idefics2ImageProcessor's config that decide the pixels (its defaults)."""

    do_resize: bool = True
    size: dict[str, int] | None = None  # {"shortest_edge", "longest_edge"} or {"height", "width"}
    resample: int = PIL_BILINEAR
    do_image_splitting: bool = False
    normalize: ImageProcessorConfig | None = None  # rescale + normalize only (no resize or crop)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Idefics2ImageProcessor":
        size = {key: int(v) for key, v in (raw.get("size") or {"shortest_edge": 378, "longest_edge": 980}).items()
                if v is not None}
        if not ({"shortest_edge", "longest_edge"} <= set(size) or {"height", "width"} <= set(size)):
            raise ModelLoadError(f"{PREPROCESSOR_CONFIG_FILE}: Idefics2 size {size} needs shortest_edge and "
                                 "longest_edge, or height and width")
        normalize = ImageProcessorConfig(
            do_resize=False, do_center_crop=False, do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=tuple(float(x) for x in raw.get("image_mean") or IMAGENET_STANDARD_MEAN),
            image_std=tuple(float(x) for x in raw.get("image_std") or IMAGENET_STANDARD_STD))
        return cls(do_resize=bool(raw.get("do_resize", True)), size=size,
                   resample=int(raw.get("resample", PIL_BILINEAR)),
                   do_image_splitting=bool(raw.get("do_image_splitting", False)), normalize=normalize)

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "Idefics2ImageProcessor":
        raw = read_image_processor_config(model_dir)
        if raw is None:
            log.warning("%s has no image processor config (%s); using Idefics2's default preprocessing", model_dir,
                        PREPROCESSOR_CONFIG_FILE)
            raw = {}
        return cls.from_dict(raw)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The longest edge down to longest_edge (aspect kept, the other edge truncated), then both
        edges up to at least shortest_edge; or exactly height x width."""
        size = self.size
        if "height" in size and "longest_edge" not in size:
            return size["height"], size["width"]
        aspect = width / height
        if width >= height and width > size["longest_edge"]:
            width = size["longest_edge"]
            height = int(width / aspect)
        elif height > width and height > size["longest_edge"]:
            height = size["longest_edge"]
            width = int(height * aspect)
        return max(height, size["shortest_edge"]), max(width, size["shortest_edge"])

    def crops(self, image) -> list[np.ndarray]:
        """One image -> its preprocessed crops, f32 [3, h, w] each (sizes differ between images)."""
        pixels = rgb_pixels(image)
        views = [pixels]
        if self.do_image_splitting:
            _, height, width = pixels.shape
            mid_h, mid_w = height // 2, width // 2
            views = [pixels[:, :mid_h, :mid_w], pixels[:, :mid_h, mid_w:], pixels[:, mid_h:, :mid_w],
                     pixels[:, mid_h:, mid_w:], pixels]
        out = []
        for view in views:
            if self.do_resize:
                view = resize_pixels(np.ascontiguousarray(view), *self.resized_shape(*view.shape[1:]), self.resample)
            out.append(preprocess_pixels(view, self.normalize))
        return out


# --------------------------------------------------------------------------- connector


class PerceiverLayer(nnx.Module):
    """latents += o(attn(q(norm(latents)), kv(concat(norm(context), norm(latents))))); latents += mlp(norm(latents))."""

    def __init__(self, input_latents_norm: RMSNorm, input_context_norm: RMSNorm, q_proj: Linear, k_proj: Linear,
                 v_proj: Linear, o_proj: Linear, post_attention_layernorm: RMSNorm, mlp: GatedMLP,
                 config: PerceiverConfig):
        self.input_latents_norm, self.input_context_norm = input_latents_norm, input_context_norm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.num_key_value_heads, config.head_dim

    def __call__(self, latents, context, key_mask):
        batch, n_latents, _ = latents.shape
        normed_latents = self.input_latents_norm(latents)
        both = jnp.concatenate([self.input_context_norm(context), normed_latents], axis=1)

        def heads(y, count):
            return y.reshape(batch, y.shape[1], count, self.head_dim).transpose(0, 2, 1, 3)

        q = heads(self.q_proj(normed_latents), self.n_heads)
        groups = self.n_heads // self.n_kv_heads
        k = jnp.repeat(heads(self.k_proj(both), self.n_kv_heads), groups, axis=1)
        v = jnp.repeat(heads(self.v_proj(both), self.n_kv_heads), groups, axis=1)
        out = masked_attention(q, k, v, key_mask, self.head_dim ** -0.5)
        latents = latents + self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, n_latents, -1))
        return latents + self.mlp(self.post_attention_layernorm(latents))


class Idefics2Connector(nnx.Module):
    """(vision hidden [N, L, Dv], patch mask [N, L]) -> [N, n_latents, text hidden]."""

    def __init__(self, modality_projection: GatedMLP, latents: np.ndarray, layers: list[PerceiverLayer],
                 norm: RMSNorm):
        self.modality_projection = modality_projection
        self.latents = nnx.Param(jnp.asarray(latents, jnp.float32))
        self.layers = nnx.List(layers)
        self.norm = norm

    def __call__(self, image_hidden, patch_mask):
        context = self.modality_projection(image_hidden)
        batch = context.shape[0]
        latents = jnp.broadcast_to(self.latents[...], (batch, *self.latents.shape))
        key_mask = jnp.concatenate([patch_mask, jnp.ones((batch, latents.shape[1]), bool)], axis=1)
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)


class Idefics2ImageModel(nnx.Module):
    """packed [N, L, C*p*p + 2] (patches, then position id and mask as f32 columns, so one array
    goes through `ImageEncoder`) -> [N, n_latents, text hidden]."""

    def __init__(self, vision_model: SiglipVisionEncoder, connector: Idefics2Connector):
        self.vision_model = vision_model
        self.connector = connector

    def __call__(self, packed):
        patches = packed[..., :-2]
        position_ids = packed[..., -2].astype(jnp.int32)
        mask = packed[..., -1] > 0.5
        return self.connector(self.vision_model(patches, position_ids, mask), mask)


def pack_crop(pixels: np.ndarray, config: SiglipVisionConfig) -> np.ndarray:
    """f32 [3, h, w] -> [num_positions, C*p*p + 2] (see Idefics2ImageModel)."""
    patches, positions, mask = patchify(pixels, config)
    return np.concatenate([patches, positions[:, None].astype(np.float32), mask[:, None].astype(np.float32)], axis=1)


def _prefix_of(names, suffix: str, source: str) -> str:
    found = sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))
    if not found:
        raise ModelLoadError(f"{source}: the checkpoint has no *{suffix} tensor (not an Idefics2 checkpoint?)")
    return found[0]


def build_idefics2_image_model(model_dir: str, config: Idefics2Config, source: WeightSource,
                               dtype=jnp.float32) -> Idefics2ImageModel:
    """The SigLIP encoder and the connector from `source`, the checkpoint's weights (dense: no ISQ here)."""
    names = source.tensor_names
    vision = build_siglip_encoder(config.vision, source,
                                  _prefix_of(names, "embeddings.patch_embedding.weight", model_dir), dtype=dtype)
    at = _prefix_of(names, "modality_projection.gate_proj.weight", model_dir)
    text_act = config.text.hidden_act
    projection = GatedMLP(source.linear(at + "modality_projection.down_proj"), text_act,
                          gate=source.linear(at + "modality_projection.gate_proj"),
                          up=source.linear(at + "modality_projection.up_proj"))
    if projection.gate_proj.in_features != config.vision.hidden_size or \
            projection.down_proj.out_features != config.text.hidden_size:
        raise CorruptModelFileError(
            f"{model_dir}: the modality projection maps {projection.gate_proj.in_features} -> "
            f"{projection.down_proj.out_features}, but the config needs {config.vision.hidden_size} -> "
            f"{config.text.hidden_size}")
    p = config.perceiver
    at += "perceiver_resampler."
    layers = []
    for i in range(p.depth):
        layer = f"{at}layers.{i}."
        mlp = GatedMLP(source.linear(layer + "mlp.down_proj"), p.hidden_act,
                       gate=source.linear(layer + "mlp.gate_proj"), up=source.linear(layer + "mlp.up_proj"))
        layers.append(PerceiverLayer(
            source.rms_norm(layer + "input_latents_norm", p.rms_norm_eps),
            source.rms_norm(layer + "input_context_norm", p.rms_norm_eps),
            *(source.linear(layer + "self_attn." + name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
            source.rms_norm(layer + "post_attention_layernorm", p.rms_norm_eps), mlp, p))
    latents = source.array(at + "latents")
    if latents.shape != (p.n_latents, p.hidden_size):
        raise CorruptModelFileError(f"{model_dir}: the perceiver latents have shape {latents.shape}, the config "
                                    f"needs ({p.n_latents}, {p.hidden_size})")
    connector = Idefics2Connector(projection, latents, layers, source.rms_norm(at + "norm", p.rms_norm_eps))
    return Idefics2ImageModel(vision, connector)


# --------------------------------------------------------------------------- the image side


class Idefics2Vision:
    """The image side of a loaded Idefics2 model (the counterpart of transformers' Idefics2Processor)."""

    arch = "idefics2"

    def __init__(self, model_dir: str, config: Idefics2Config, tokenizer, source: WeightSource, dtype=jnp.float32):
        self.config = config
        self.tokenizer = tokenizer
        self.image_token_id = config.image_token_id
        self.image_token = tokenizer.id_to_token(config.image_token_id)
        self.fake_token_id = tokenizer.token_to_id(FAKE_IMAGE_TOKEN)
        if self.image_token is None or self.fake_token_id is None:
            raise UnsupportedArchitectureError(
                f"{model_dir}: an Idefics2 tokenizer needs the image token {config.image_token_id} (the config's "
                f"image_token_id) and {FAKE_IMAGE_TOKEN}")
        self.processor = Idefics2ImageProcessor.from_model_dir(model_dir)
        self.crops_per_image = 5 if self.processor.do_image_splitting else 1
        self.tokens_per_image = config.perceiver.n_latents  # per crop
        self.image_model = build_idefics2_image_model(model_dir, config, source, dtype)
        v = config.vision
        self.encoder = ImageEncoder(self.image_model, (v.num_positions, v.num_channels * v.patch_size ** 2 + 2),
                                    buckets=CROP_BATCH_BUCKETS)
        log.info("idefics2 vision: SigLIP %d layers, %dx%d patches of %d px at most, perceiver %d latents x %d "
                 "layers, %d crop(s) per image, image token %r", v.num_layers, v.grid, v.grid, v.patch_size,
                 config.perceiver.n_latents, config.perceiver.depth, self.crops_per_image, self.image_token)

    # -- images -> features -------------------------------------------------------------

    def pixel_values(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Every image's crops, f32 [3, h, w] each, in order (sizes vary)."""
        return [crop for image in images for crop in self.processor.crops(load_image(image))]

    def image_features(self, pixel_values: Sequence[np.ndarray]) -> np.ndarray:
        """[crops, n_latents, text hidden] f32."""
        return self.encoder.encode(np.stack([pack_crop(crop, self.config.vision) for crop in pixel_values]))

    def encode_images(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        crops = self.pixel_values(images)
        features = self.image_features(crops)
        per_image = features.reshape(len(images), -1, features.shape[-1])
        return list(per_image), crops

    # -- prompts ------------------------------------------------------------------------

    def _with_leading_space(self, segment: list[int]) -> list[int]:
        """Text glued to a closing fake token, tokenized as the processor does after putting a space
        there (unless it starts with whitespace or "<"): the first word is re-encoded behind a fake
        token, so the tokenizer sees the same context it sees in the processor's text."""
        if not segment or segment[0] in getattr(self.tokenizer, "special_token_ids", ()):
            return segment
        first = self.tokenizer.id_to_token(segment[0]) or ""
        if first[:1] in ("", " ", "\t", "\n", "\u2581", "\u0120", "\u010a", "<"):  # "<": also <0x..> bytes, <unk>
            return segment
        end = 1  # the first word: up to the next token that starts with a space marker (or a special one)
        while end < len(segment):
            piece = self.tokenizer.id_to_token(segment[end]) or ""
            if not piece or piece[0] in " \u2581\u0120<":
                break
            end += 1
        word = self.tokenizer.decode(segment[:end], skip_special_tokens=False)
        encoded = self.tokenizer.encode(FAKE_IMAGE_TOKEN + " " + word, add_special_tokens=False)
        if not encoded or encoded[0] != self.fake_token_id:
            return segment
        return encoded[1:] + segment[end:]

    def expand_placeholders(self, prompt_ids: Sequence[int], num_images: int) -> list[int]:
        """Each `<image>` -> fake + n x image + fake (per crop), adjacent fakes merged; a prompt
        already expanded (n image tokens per crop around fake tokens) is returned unchanged."""
        ids = [int(t) for t in prompt_ids]
        count = sum(1 for t in ids if t == self.image_token_id)
        per_image = self.tokens_per_image * self.crops_per_image
        if count == per_image * num_images and count > num_images and self.fake_token_id in ids:
            return ids
        if count != num_images:
            raise ImageError(
                f"the prompt has {count} image placeholder tokens ({self.image_token!r}) for {num_images} image(s): "
                f"put exactly one {self.image_token} where each image goes")
        run = ([self.fake_token_id] + [self.image_token_id] * self.tokens_per_image) * self.crops_per_image
        expanded: list[int] = []
        index = 0
        while index < len(ids):
            token = ids[index]
            index += 1
            if token != self.image_token_id:
                if not (token == self.fake_token_id and expanded and expanded[-1] == self.fake_token_id):
                    expanded.append(token)
                continue
            if expanded and expanded[-1] == self.fake_token_id:
                expanded.pop()
            expanded.extend(run + [self.fake_token_id])
            if index < len(ids) and ids[index] not in (self.image_token_id, self.fake_token_id):
                end = index
                while end < len(ids) and ids[end] not in (self.image_token_id, self.fake_token_id):
                    end += 1
                expanded.extend(self._with_leading_space(ids[index:end]))
                index = end
        return expanded

    def prepare(self, prompt_ids: Sequence[int], images: Sequence[Any],
                check_length: Callable[[int], None] | None = None) -> tuple[list[int], MultiModalInputs]:
        """(expanded prompt ids, image inputs for the engine) for a prompt with one placeholder per image.
        `check_length(n)` (the engine's prompt-length check) sees the expanded length before the
        encoder runs, so an over-long request is refused without the work."""
        if not images:
            raise ImageError("prepare() needs at least one image")
        ids = self.expand_placeholders(prompt_ids, len(images))  # fails before the encoder runs
        if check_length is not None:
            check_length(len(ids))
        features, crops = self.encode_images(images)
        positions = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        return ids, MultiModalInputs(positions=positions, embeds=np.concatenate(features), num_images=len(images),
                                     cache_salt=image_cache_salt(crops))

    def warmup(self) -> None:
        self.encoder.warmup()
