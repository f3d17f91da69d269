"""LLaVA 1.5 (HF `LlavaForConditionalGeneration`): a CLIP ViT, a two-layer projector, a llama-family LM.

Image side: pixels -> CLIP tower (clip.py) -> the hidden state of `vision_feature_layer`
(without the class token for strategy "default") -> linear_1 -> act -> linear_2 = one row of
LM hidden size per placeholder token. It runs once per request, outside the token step,
jitted per image-count bucket (`ImageEncoder`).

Text side: the language model is the existing family builder's (models/registry.py) reading
the nested `language_model.` tensors, served by the ordinary engine; placeholder positions
take the projected features instead of token embeddings (inputs.py, engine/multimodal.py).

The prompt carries one `<image>` placeholder per image, which `LlavaVision.prepare` expands
to `tokens_per_image` copies, as transformers' LlavaProcessor does:
(crop / patch)^2 + num_additional_image_tokens (1 for CLIP's class token), minus 1 when the
strategy ("default") drops the class token: 576 for 336-px images and 14-px patches.
LLaVA-NeXT (llava_next.py) reuses all of this and changes how images become feature rows.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...config import ModelConfig
from ..model_config import config_from_hf, with_generation_eos
from ...errors import CorruptModelFileError, ImageError, ModelLoadError, NotSupportedError
from ...json_files import read_json_object
from ..layers import Linear
from ..weights import WeightSource
from .clip import CLIPVisionConfig, CLIPVisionTower, build_clip_vision_tower, feature_layer_indices, \
    vision_activation, vision_tower_prefix
from .image_processing import ImageProcessorConfig, load_image, preprocess_image
from .inputs import MultiModalInputs, image_cache_salt

log = logging.getLogger(__name__)

# transformers' LlavaNextConfig default (height, width) tiling resolutions.
LLAVA_NEXT_DEFAULT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
# Images per vision-tower call, padded up to one of these (each compiled once at warm-up).
IMAGE_BATCH_BUCKETS = (1, 2, 4)

# transformers fills a text_config's missing keys from its model_type's config class; the
# LLaVA 1.5 checkpoints rely on that (their text_config lists only a few keys).
TEXT_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu", tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", sliding_window=4096,
                    tie_word_embeddings=False),
}


@dataclass
class LlavaConfig:
    vision: CLIPVisionConfig
    text: ModelConfig
    image_token_id: int
    projector_act: str
    feature_layers: tuple[int, ...]  # indices into the tower's hidden states (0 = embeddings)
    keep_class_token: bool  # vision_feature_select_strategy "full"
    pad_to_square: bool  # original LLaVA configs: image_aspect_ratio "pad"
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # LLaVA-NeXT: tiling resolutions (height, width)

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "LlavaConfig":
        source = os.path.join(model_dir, "config.json")
        raw = read_json_object(source)
        text_raw = dict(raw.get("text_config") or {})
        text_type = text_raw.setdefault("model_type", "llama")
        text_raw = {**TEXT_CONFIG_DEFAULTS.get(text_type, {}), **text_raw}
        text_raw.pop("architectures", None)  # the family comes from model_type
        if "torch_dtype" not in text_raw and "dtype" not in text_raw:
            text_raw["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype")
        text = config_from_hf(text_raw, source=source)
        text = with_generation_eos(text, model_dir)
        vision = CLIPVisionConfig.from_hf(raw.get("vision_config") or {}, source)
        strategy = raw.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise NotSupportedError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported "
                                    "(supported: default, full)")
        token = raw.get("image_token_index", raw.get("image_token_id", 32000))
        act = raw.get("projector_hidden_act", "gelu")
        vision_activation(act)
        return cls(vision=vision, text=text, image_token_id=int(token), projector_act=act,
                   feature_layers=feature_layer_indices(raw.get("vision_feature_layer", -2), vision.num_layers),
                   keep_class_token=strategy == "full", pad_to_square=raw.get("image_aspect_ratio") == "pad",
                   image_grid_pinpoints=[(int(h), int(w)) for h, w in raw.get("image_grid_pinpoints") or
                                         LLAVA_NEXT_DEFAULT_PINPOINTS])


class LlavaProjector(nnx.Module):
    """linear_2(act(linear_1(features)))."""

    def __init__(self, linear_1: Linear, linear_2: Linear, act: str):
        self.linear_1, self.linear_2 = linear_1, linear_2
        self.act = act

    def __call__(self, x):
        return self.linear_2(vision_activation(self.act)(self.linear_1(x)))


class LlavaImageModel(nnx.Module):
    """pixels [N, 3, H, W] -> LM-space features [N, tokens_per_image, text hidden]."""

    def __init__(self, tower: CLIPVisionTower, projector: LlavaProjector):
        self.vision_tower = tower
        self.multi_modal_projector = projector

    def __call__(self, pixel_values):
        return self.multi_modal_projector(self.vision_tower(pixel_values))


class ImageEncoder:
    """Runs an image model over image batches padded to `IMAGE_BATCH_BUCKETS`, jitted once per bucket
    over flat weight leaves (the runner's design rule 8). Thread-safe: requests encode their
    images on the thread that adds them."""

    def __init__(self, model: nnx.Module, image_shape: tuple[int, int, int], buckets=IMAGE_BATCH_BUCKETS):
        self.graphdef, state = nnx.split(model)
        self.leaves, self._treedef = jax.tree.flatten(state)
        self.image_shape = image_shape
        self.buckets = tuple(sorted(buckets))
        self._fn = jax.jit(self._forward)

    def _forward(self, leaves, pixel_values):
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves))
        return model(pixel_values).astype(jnp.float32)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] -> [N, tokens, hidden] f32 on the host."""
        outputs = []
        largest = self.buckets[-1]
        for first in range(0, len(pixel_values), largest):
            chunk = pixel_values[first:first + largest]
            size = next(b for b in self.buckets if b >= len(chunk))
            padded = np.zeros((size, *self.image_shape), np.float32)
            padded[:len(chunk)] = chunk
            outputs.append(np.asarray(self._fn(self.leaves, padded))[:len(chunk)])
        return np.concatenate(outputs)

    def warmup(self) -> None:
        for size in self.buckets:
            jax.block_until_ready(self._fn(self.leaves, np.zeros((size, *self.image_shape), np.float32)))


def _module_named(names, suffix: str, source: str) -> str:
    """The module whose weight is stored under a name ending in `suffix`.weight (any nesting)."""
    found = sorted(n[: -len(".weight")] for n in names if n.endswith(suffix + ".weight"))
    if not found:
        raise ModelLoadError(f"{source}: the checkpoint has no {suffix} weights")
    return found[0]


def build_llava_image_model(model_dir: str, config: LlavaConfig, source: WeightSource,
                            dtype=jnp.float32) -> LlavaImageModel:
    """The tower and projector from `source`, the checkpoint's weights (dense: no ISQ here)."""
    names = source.tensor_names
    tower = build_clip_vision_tower(config.vision, source, vision_tower_prefix(names, model_dir),
                                    config.feature_layers, config.keep_class_token, dtype=dtype)
    projector = LlavaProjector(source.linear(_module_named(names, "multi_modal_projector.linear_1", model_dir)),
                               source.linear(_module_named(names, "multi_modal_projector.linear_2", model_dir)),
                               config.projector_act)
    expected_in = config.vision.hidden_size * len(config.feature_layers)
    if projector.linear_1.in_features != expected_in or projector.linear_2.out_features != config.text.hidden_size:
        raise CorruptModelFileError(
            f"{model_dir}: the projector maps {projector.linear_1.in_features} -> {projector.linear_2.out_features}, "
            f"but the config needs {expected_in} -> {config.text.hidden_size}")
    return LlavaImageModel(tower, projector)


class LlavaVision:
    """The image side of a loaded LLaVA model: what LLM and the server use to turn images into
    prompt placeholders plus features (the counterpart of transformers' LlavaProcessor)."""

    arch = "llava"

    def __init__(self, model_dir: str, config: LlavaConfig, image_token: str, source: WeightSource,
                 dtype=jnp.float32):
        self.config = config
        self.image_token_id = config.image_token_id
        self.image_token = image_token  # its text, for templates that take text only
        self.processor = ImageProcessorConfig.from_model_dir(model_dir, pad_to_square=config.pad_to_square)
        height, width = self.processor.output_size
        if (height, width) != (config.vision.image_size,) * 2:
            raise ModelLoadError(f"{model_dir}: the image processor makes {height}x{width} images but the vision "
                                 f"tower takes {config.vision.image_size}x{config.vision.image_size}")
        self.image_model = build_llava_image_model(model_dir, config, source, dtype)
        self.tokens_per_image = self.image_model.vision_tower.num_tokens  # per tower input (LLaVA-NeXT: per tile)
        self.encoder = ImageEncoder(self.image_model, (config.vision.num_channels, height, width))
        log.info("%s vision: CLIP %d/%d layers at %dpx (patch %d), %d tokens per %s, image token %r", self.arch,
                 len(self.image_model.vision_tower.layers), config.vision.num_layers, config.vision.image_size,
                 config.vision.patch_size, self.tokens_per_image, "tile" if self.arch != "llava" else "image",
                 image_token)

    # -- images -> features -------------------------------------------------------------

    def pixel_values(self, images: Sequence[Any]) -> np.ndarray:
        """[N, 3, H, W] f32 for images given as anything `load_image` takes."""
        return np.stack([preprocess_image(load_image(image), self.processor) for image in images])

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, tokens_per_image, text hidden] f32."""
        return self.encoder.encode(pixel_values)

    def encode_images(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(each image's feature rows [n_i, text hidden], each image's pixels, for the cache salt)."""
        pixels = self.pixel_values(images)
        return list(self.image_features(pixels)), list(pixels)

    # -- prompts ------------------------------------------------------------------------

    def expand_placeholders(self, prompt_ids: Sequence[int], tokens_per_image: Sequence[int]) -> list[int]:
        """The i-th image's one placeholder becomes `tokens_per_image[i]` of them; a prompt already
        expanded (as transformers' processor makes it) is returned unchanged."""
        ids = [int(t) for t in prompt_ids]
        count = sum(1 for t in ids if t == self.image_token_id)
        if count == sum(tokens_per_image) and count > len(tokens_per_image):
            return ids
        if count != len(tokens_per_image):
            raise ImageError(
                f"the prompt has {count} image placeholder tokens ({self.image_token!r}) for {len(tokens_per_image)} "
                f"image(s): put exactly one {self.image_token} where each image goes")
        expanded: list[int] = []
        sizes = iter(tokens_per_image)
        for token in ids:
            expanded.extend([token] * next(sizes) if token == self.image_token_id else [token])
        return expanded

    def prepare(self, prompt_ids: Sequence[int], images: Sequence[Any],
                check_length: Callable[[int], None] | None = None) -> tuple[list[int], MultiModalInputs]:
        """(expanded prompt ids, image inputs for the engine) for a prompt with one placeholder per image.
        `check_length(n)` (the engine's prompt-length check) sees a lower bound of the expanded length
        before the vision tower runs, so an over-long request is refused without the work."""
        if not images:
            raise ImageError("prepare() needs at least one image")
        placeholders = sum(1 for t in prompt_ids if int(t) == self.image_token_id)
        if placeholders < len(images):  # fail before the vision tower runs
            self.expand_placeholders(prompt_ids, [1] * len(images))
        if check_length is not None and placeholders == len(images):  # not yet expanded: one per image
            check_length(len(prompt_ids) + len(images) * (self.tokens_per_image - 1))
        features, pixels = self.encode_images(images)
        ids = self.expand_placeholders(prompt_ids, [len(f) for f in features])
        positions = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        return ids, MultiModalInputs(positions=positions, embeds=np.concatenate(features), num_images=len(images),
                                     cache_salt=image_cache_salt(pixels))

    def warmup(self) -> None:
        self.encoder.warmup()
