"""Phi-3 Vision (Phi-3-vision-128k-instruct, Phi-3.5-vision-instruct; HF `Phi3VForCausalLM`).

Image side (the published `image_embedding_phi3_v.py`, read for its facts): every view of an
image (phi3v_processing.py: the global view, then the HD crops row by row) goes through a
CLIP ViT-L/14-336 tower (clip.py), read at `img_processor.layer_idx` (default -2) without the
class token: a 24 x 24 patch grid per view. Each 2 x 2 block of patches is merged into one
row of 4 x 1024 channels (the block's patches in row-major order, channels innermost), so a
view is 12 x 12 merged rows. The crops' grids are laid side by side into one
(h * 12) x (w * 12) map, a learned separator `sub_GN` ends each of its rows, and the global
view gets the same; `glb_GN` sits between the two parts, whose order is the config's
`embd_layer.hd_transform_order` ("sub_glb": crops first, both published checkpoints; or
"glb_sub"). A projection MLP (Linear(4096, hidden) -> GELU -> Linear(hidden, hidden),
`img_projection.0` / `.2`) maps every row into the language model's embedding space.

The MLP works row by row, so here it runs inside the jitted tower call on each view's merged
rows, and the separators are projected once at load; the layout is then a host-side
gather, per image, of projected rows.

Prompt side (the published processor): the chat template's text holds a tag per image; the
processor tokenizes the text between tags separately (each piece with its BOS) and puts the
image's token count of placeholders at each tag. Here each image is the tokenizer's
`<|image|>` special token (a template that takes text only gets one per image part, and
`<|image_N|>` tags written in chat text become it: messages.py); it becomes the placeholders
followed by BOS, which is the same ids wherever the tokenizer cuts its input at special tokens
and prepends its word marker to every piece (as Phi-3's SentencePiece-style tokenizer does).
The token count of an image follows from its size alone, so an over-long prompt is refused
before any pixel work.

The published checkpoints carry no vision config (the tower is fixed); a `vision_config`
(CLIPVisionConfig keys) in config.json replaces it, which the tests' tiny checkpoint uses.

Text side: the checkpoint's own top-level config is a Phi-3 one (model_type "phi3_v"); the
language model is the phi3 family's builder reading `model.layers.*` through the ordinary engine.
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
from ...errors import CorruptModelFileError, ImageError, ModelLoadError, NotSupportedError, \
    UnsupportedArchitectureError
from ...json_files import read_json_object
from ..layers import Linear
from ..model_config import config_from_hf, with_generation_eos
from ..weights import WeightSource
from .clip import CLIPVisionConfig, CLIPVisionTower, build_clip_vision_tower, feature_layer_indices, \
    vision_activation
from .image_processing import load_image
from .inputs import MultiModalInputs, image_cache_salt
from .llava import ImageEncoder
from .phi3v_processing import Phi3VImageProcessor, num_image_tokens

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<|image|>"
# The published model hard-codes its tower: CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336).
CLIP_VIT_L_14_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                                     image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PREFIX = "model.vision_embed_tokens."
# Views per tower call, padded up to one of these (an image is 1 + rows * cols views).
VIEW_BATCH_BUCKETS = (1, 2, 4, 8)


@dataclass
class Phi3VConfig:
    vision: CLIPVisionConfig
    text: ModelConfig
    feature_layers: tuple[int, ...]
    hd_transform_order: str  # "sub_glb" or "glb_sub"
    num_img_tokens: int  # merged rows per view (144)

    @property
    def merged_grid(self) -> int:
        return self.vision.grid // 2

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "Phi3VConfig":
        source = os.path.join(model_dir, "config.json")
        raw = read_json_object(source)
        text_raw = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map")}
        text_raw["model_type"] = "phi3"
        text = with_generation_eos(config_from_hf(text_raw, source=source), model_dir)
        img = raw.get("img_processor")
        if not isinstance(img, dict) or img.get("name", "clip_vision_model") != "clip_vision_model":
            raise NotSupportedError(f"{source}: img_processor {img!r} is not supported (supported: a CLIP vision "
                                    "model, {\"name\": \"clip_vision_model\", ...})")
        # The published checkpoints carry no vision config (the tower is fixed); one given here wins.
        vision = CLIPVisionConfig.from_hf(raw["vision_config"], source) if isinstance(
            raw.get("vision_config"), dict) else CLIP_VIT_L_14_336
        embd = raw.get("embd_layer") or {}
        if not (embd.get("use_hd_transform") and embd.get("with_learnable_separator")):
            raise NotSupportedError(f"{source}: embd_layer {embd!r}: only the HD transform with learnable "
                                    "separators (use_hd_transform and with_learnable_separator true) is supported")
        if embd.get("projection_cls", "mlp") != "mlp":
            raise NotSupportedError(f"{source}: embd_layer.projection_cls {embd.get('projection_cls')!r} is not "
                                    "supported with the HD transform (supported: mlp)")
        order = embd.get("hd_transform_order", "glb_sub")
        if order not in ("sub_glb", "glb_sub"):
            raise NotSupportedError(f"{source}: embd_layer.hd_transform_order {order!r} is not supported "
                                    "(supported: sub_glb, glb_sub)")
        if img.get("type_feature", "patch") != "patch":
            raise NotSupportedError(f"{source}: img_processor.type_feature {img.get('type_feature')!r} is not "
                                    "supported with the HD transform (supported: patch)")
        if vision.grid % 2:
            raise ModelLoadError(f"{source}: the vision tower's {vision.grid} x {vision.grid} patch grid cannot be "
                                 "merged 2 x 2")
        dim_out = int(img.get("image_dim_out", vision.hidden_size))
        if dim_out != vision.hidden_size:
            raise ModelLoadError(f"{source}: img_processor.image_dim_out {dim_out} differs from the vision tower's "
                                 f"hidden size {vision.hidden_size}")
        tokens = int(img.get("num_img_tokens", (vision.grid // 2) ** 2))
        if tokens != (vision.grid // 2) ** 2:
            raise ModelLoadError(f"{source}: img_processor.num_img_tokens {tokens} is not the "
                                 f"{vision.grid // 2} x {vision.grid // 2} merged patch grid")
        return cls(vision=vision, text=text, hd_transform_order=order, num_img_tokens=tokens,
                   feature_layers=feature_layer_indices(int(img.get("layer_idx", -2)), vision.num_layers))


def merge_2x2(features, grid: int):
    """[N, grid * grid, C] patch rows -> [N, (grid / 2)^2, 4C]: each 2 x 2 block's patches in
    row-major order, channels innermost."""
    n, _, channels = features.shape
    half = grid // 2
    blocks = features.reshape(n, half, 2, half, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, half * half, 4 * channels)


class Phi3VProjection(nnx.Module):
    """img_projection: Linear -> GELU (exact) -> Linear."""

    def __init__(self, fc1: Linear, fc2: Linear):
        self.fc1, self.fc2 = fc1, fc2

    def __call__(self, x):
        return self.fc2(vision_activation("gelu")(self.fc1(x)))


class Phi3VViewModel(nnx.Module):
    """views [N, 3, S, S] -> projected merged rows [N, (grid / 2)^2, text hidden]."""

    def __init__(self, tower: CLIPVisionTower, projection: Phi3VProjection):
        self.img_processor = tower
        self.img_projection = projection

    def __call__(self, pixel_values):
        features = self.img_processor(pixel_values)
        return self.img_projection(merge_2x2(features, self.img_processor.config.grid))


def hd_row_order(rows: int, cols: int, grid: int, order: str) -> np.ndarray:
    """Where each of an image's token rows comes from, as indices into
    [view 0 rows..., view 1 rows..., ..., sub_GN, glb_GN] (each view grid^2 rows, view 0 the
    global one, views 1.. the crops row by row); the tokens count `num_image_tokens`."""
    per_view = grid * grid
    sub_separator = (1 + rows * cols) * per_view
    glb_separator = sub_separator + 1
    sub = []
    for r in range(rows * grid):
        crop_row, in_row = divmod(r, grid)
        for c in range(cols * grid):
            crop_col, in_col = divmod(c, grid)
            view = 1 + crop_row * cols + crop_col
            sub.append(view * per_view + in_row * grid + in_col)
        sub.append(sub_separator)
    glb = []
    for r in range(grid):
        glb.extend(r * grid + c for c in range(grid))
        glb.append(sub_separator)
    parts = [sub, [glb_separator], glb] if order == "sub_glb" else [glb, [glb_separator], sub]
    return np.asarray([i for part in parts for i in part], np.int64)


def build_phi3v_view_model(model_dir: str, config: Phi3VConfig, source: WeightSource,
                           dtype=jnp.float32) -> tuple[Phi3VViewModel, np.ndarray, np.ndarray]:
    """(the view model, sub_GN [4C], glb_GN [4C]) from the checkpoint's `model.vision_embed_tokens.*`."""
    names = set(source.tensor_names)
    tower_prefix = PREFIX + "img_processor.vision_model."
    if tower_prefix + "embeddings.patch_embedding.weight" not in names:
        raise ModelLoadError(f"{model_dir}: no Phi-3 Vision tower weights ({tower_prefix}*) in the checkpoint")
    tower = build_clip_vision_tower(config.vision, source, tower_prefix, config.feature_layers,
                                    keep_class_token=False, dtype=dtype)
    projection = Phi3VProjection(source.linear(PREFIX + "img_projection.0"), source.linear(PREFIX + "img_projection.2"))
    merged = 4 * config.vision.hidden_size
    if projection.fc1.in_features != merged or projection.fc2.out_features != config.text.hidden_size:
        raise CorruptModelFileError(
            f"{model_dir}: img_projection maps {projection.fc1.in_features} -> {projection.fc2.out_features}, but "
            f"the config needs {merged} -> {config.text.hidden_size}")
    separators = []
    for name in ("sub_GN", "glb_GN"):
        if PREFIX + name not in names:
            raise ModelLoadError(f"{model_dir}: the checkpoint has no {PREFIX}{name} separator")
        value = source.array(PREFIX + name).reshape(-1)
        if value.shape != (merged,):
            raise CorruptModelFileError(f"{model_dir}: {PREFIX}{name} has {value.size} values, expected {merged}")
        separators.append(value)
    return Phi3VViewModel(tower, projection), separators[0], separators[1]


class Phi3VVision:
    """The image side of a loaded Phi-3 Vision model (the counterpart of its published processor)."""

    arch = "phi3v"

    def __init__(self, model_dir: str, config: Phi3VConfig, tokenizer, source: WeightSource, dtype=jnp.float32):
        self.config = config
        self.tokenizer = tokenizer
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None:
            raise UnsupportedArchitectureError(f"{model_dir}: a Phi-3 Vision tokenizer needs the {IMAGE_TOKEN} token")
        self._keep_whitespace_around_image_token()
        self.bos_ids = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) and \
            tokenizer.bos_token_id is not None else []
        self.processor = Phi3VImageProcessor.from_model_dir(model_dir, crop_size=config.vision.image_size)
        self.grid = config.merged_grid
        model, sub_gn, glb_gn = build_phi3v_view_model(model_dir, config, source, dtype)
        self.view_model = model
        self.separators = np.asarray(model.img_projection(jnp.asarray(np.stack([sub_gn, glb_gn]))), np.float32)
        v = config.vision
        self.encoder = ImageEncoder(model, (v.num_channels, v.image_size, v.image_size), buckets=VIEW_BATCH_BUCKETS)
        log.info("phi3v vision: CLIP %d/%d layers at %dpx (patch %d), num_crops %d, %d rows per view, %s",
                 len(model.img_processor.layers), v.num_layers, v.image_size, v.patch_size,
                 self.processor.num_crops, self.grid ** 2, config.hd_transform_order)

    def _keep_whitespace_around_image_token(self) -> None:
        """Phi-3's tokenizer strips the whitespace after its added tokens (rstrip), `<|image|>` among
        them; the processor's `<|image_N|>` tags are plain text and keep it. So the marker here is
        re-registered without stripping (the tokenizer takes `<|image|>` from no other text)."""
        backend = getattr(self.tokenizer, "backend", None)
        added = backend.get_added_tokens_decoder().get(self.image_token_id) if backend is not None else None
        if added is None or not (added.rstrip or added.lstrip):
            return
        from tokenizers import AddedToken

        backend.add_special_tokens([AddedToken(IMAGE_TOKEN, rstrip=False, lstrip=False, normalized=False,
                                               special=True)])
        if backend.token_to_id(IMAGE_TOKEN) != self.image_token_id:
            raise UnsupportedArchitectureError(f"the tokenizer's {IMAGE_TOKEN} token could not be re-registered")
        log.info("%s keeps the whitespace around it now (the tokenizer stripped it)", IMAGE_TOKEN)

    # -- images -> features -------------------------------------------------------------

    def image_grid(self, image) -> tuple[int, int]:
        """(crop rows, crop columns) of a PIL image."""
        return self.processor.crop_grid(*image.size)

    def tokens_for(self, image) -> int:
        """Image tokens of a PIL image (from its size alone)."""
        return num_image_tokens(*self.image_grid(image), self.grid)

    def image_views(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        return self.processor.views(image)

    def layout(self, projected: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """Projected views [1 + rows * cols, grid^2, D] -> the image's token rows [n, D]."""
        table = np.concatenate([projected.reshape(-1, projected.shape[-1]), self.separators])
        return table[hd_row_order(rows, cols, self.grid, self.config.hd_transform_order)]

    def encode_images(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(each image's token rows [n_i, text hidden], each image's views, for the cache salt)."""
        per_image = [self.image_views(load_image(image)) for image in images]
        projected = self.encoder.encode(np.concatenate([views for views, _ in per_image]))
        features, first = [], 0
        for views, (rows, cols) in per_image:
            features.append(self.layout(projected[first:first + len(views)], rows, cols))
            first += len(views)
        return features, [views for views, _ in per_image]

    # -- prompts ------------------------------------------------------------------------

    def expand_placeholders(self, prompt_ids: Sequence[int], tokens_per_image: Sequence[int]) -> list[int]:
        """Each image's `<|image|>` -> its placeholders followed by BOS (the processor tokenizes the
        text after an image on its own, BOS first); a prompt already expanded is returned unchanged."""
        ids = [int(t) for t in prompt_ids]
        count = sum(1 for t in ids if t == self.image_token_id)
        if count == sum(tokens_per_image) and count > len(tokens_per_image):
            return ids
        if count != len(tokens_per_image):
            raise ImageError(f"the prompt has {count} image tokens ({IMAGE_TOKEN!r}) for {len(tokens_per_image)} "
                             f"image(s): put exactly one {IMAGE_TOKEN} where each image goes (a raw prompt takes "
                             f"{IMAGE_TOKEN}, not <|image_N|>; in chat messages image parts or <|image_N|> tags "
                             "place them)")
        expanded: list[int] = []
        sizes = iter(tokens_per_image)
        for token in ids:
            expanded.extend([token] * next(sizes) + self.bos_ids if token == self.image_token_id else [token])
        return expanded

    def prepare(self, prompt_ids: Sequence[int], images: Sequence[Any],
                check_length: Callable[[int], None] | None = None) -> tuple[list[int], MultiModalInputs]:
        """(expanded prompt ids, image inputs for the engine) for a prompt with one `<|image|>` per image.
        The token count of each image follows from its size alone, so `check_length(n)` (the engine's
        prompt-length check) sees the exact expanded length before any image is resized or encoded."""
        if not images:
            raise ImageError("prepare() needs at least one image")
        loaded = [load_image(image) for image in images]
        ids = self.expand_placeholders(prompt_ids, [self.tokens_for(image) for image in loaded])
        if check_length is not None:
            check_length(len(ids))
        features, views = self.encode_images(loaded)
        positions = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        return ids, MultiModalInputs(positions=positions, embeds=np.concatenate(features), num_images=len(images),
                                     cache_salt=image_cache_salt(views))

    def warmup(self) -> None:
        self.encoder.warmup()
