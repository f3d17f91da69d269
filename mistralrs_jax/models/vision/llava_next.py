"""LLaVA-NeXT / 1.6 (HF `LlavaNextForConditionalGeneration`): LLaVA with "anyres" tiling.

An image is seen twice: squashed to one tile (the "base" view), and at a higher resolution
chosen from `image_grid_pinpoints` (the one keeping the most of the image's pixels, then
wasting the fewest), fitted inside it keeping its aspect ratio, zero-padded to it and cut into
tiles the size of the vision tower's input. Every tile goes through the same CLIP tower and
projector as LLaVA 1.5 (llava.py). The tiles' features are laid out again as one feature map,
the padding's rows or columns are cut off ("unpad"), and a learned `image_newline` vector ends
every row; the base view's features come first. So the number of image tokens depends on the
image's size, exactly as transformers' LlavaNextProcessor counts them.

Only the "spatial_unpad" merge with the "default" feature strategy (class token dropped) is
served, which is what transformers implements.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from ...errors import ModelLoadError, NotSupportedError
from ..weights import WeightSource
from .image_processing import load_image, preprocess_pixels, resize_pixels, rgb_pixels
from .llava import LlavaConfig, LlavaVision


def select_best_resolution(height: int, width: int, resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) among `resolutions` that shows most of an image of this size
    (downscaled to fit, never counted above its own pixel count), ties broken by least waste."""
    best, most_effective, least_wasted = None, 0, float("inf")
    for target_height, target_width in resolutions:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > most_effective or (effective == most_effective and wasted < least_wasted):
            best, most_effective, least_wasted = (target_height, target_width), effective, wasted
    return best


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The image's size scaled to fit inside the target, keeping its aspect ratio (edges rounded up)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(int(np.ceil(height * scale_w)), target_height), target_width
    return target_height, min(int(np.ceil(width * scale_h)), target_width)


def anyres_views(pixels: np.ndarray, resolutions, tile: int, base_size: tuple[int, int], resample: int) -> list:
    """uint8 [3, H, W] -> [base view, tile 0, tile 1, ...] (tiles row by row), all uint8 [3, ., .]."""
    _, height, width = pixels.shape
    best_height, best_width = select_best_resolution(height, width, resolutions)
    fit_height, fit_width = fitted_size(height, width, best_height, best_width)
    fitted = resize_pixels(pixels, fit_height, fit_width, resample)
    canvas = np.zeros((pixels.shape[0], best_height, best_width), np.uint8)
    top, left = (best_height - fit_height) // 2, (best_width - fit_width) // 2
    canvas[:, top:top + fit_height, left:left + fit_width] = fitted
    tiles = [canvas[:, row:row + tile, col:col + tile]
             for row in range(0, best_height, tile) for col in range(0, best_width, tile)]
    return [resize_pixels(pixels, *base_size, resample)] + tiles


def unpad(features: np.ndarray, height: int, width: int) -> np.ndarray:
    """[D, h, w] feature map of a padded image -> the part covering the image (original H x W)."""
    _, current_height, current_width = features.shape
    if width / height > current_width / current_height:  # padded above and below
        new_height = int(round(height * (current_width / width), 7))
        padding = (current_height - new_height) // 2
        return features[:, padding:current_height - padding, :]
    new_width = int(round(width * (current_height / height), 7))
    padding = (current_width - new_width) // 2
    return features[:, :, padding:current_width - padding]


def pack_features(views: np.ndarray, height: int, width: int, resolutions, tile: int, grid: int,
                  newline: np.ndarray) -> np.ndarray:
    """Projected features of [base, tiles...] ([1 + P, grid * grid, D]) -> the image's token rows [n, D]."""
    base = views[0]
    if len(views) == 1:
        return np.concatenate([base, newline[None]])
    best_height, best_width = select_best_resolution(height, width, resolutions)
    rows, cols = best_height // tile, best_width // tile
    dim = views.shape[-1]
    feature_map = views[1:].reshape(rows, cols, grid, grid, dim).transpose(4, 0, 2, 1, 3)
    feature_map = unpad(feature_map.reshape(dim, rows * grid, cols * grid), height, width)
    ends = np.broadcast_to(newline[:, None, None], (dim, feature_map.shape[1], 1))
    feature_map = np.concatenate([feature_map, ends], axis=2)
    return np.concatenate([base, feature_map.reshape(dim, -1).T])


class LlavaNextVision(LlavaVision):
    arch = "llava_next"

    def __init__(self, model_dir: str, config: LlavaConfig, image_token: str, source: WeightSource,
                 dtype=jnp.float32):
        if config.keep_class_token:
            raise NotSupportedError(f"{model_dir}: LLaVA-NeXT with vision_feature_select_strategy \"full\" is not "
                                    "supported (transformers' feature layout assumes \"default\")")
        super().__init__(model_dir, config, image_token, source, dtype=dtype)
        names = [n for n in source.tensor_names if n == "image_newline" or n.endswith(".image_newline")]
        if not names:
            raise ModelLoadError(f"{model_dir}: a LLaVA-NeXT checkpoint needs an image_newline tensor")
        self.image_newline = source.array(sorted(names)[0]).reshape(-1)
        processor = self.processor
        self.tile = processor.crop_size["height"] if processor.do_center_crop else processor.size.get(
            "height", processor.size.get("shortest_edge"))
        size = processor.size
        self.base_size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        # The processor tiles with its pinpoints, the model lays features out with its own
        # (transformers does the same; they agree in every published checkpoint).
        self.processor_pinpoints = processor.image_grid_pinpoints or config.image_grid_pinpoints
        self.model_pinpoints = config.image_grid_pinpoints
        self.grid = config.vision.grid

    def image_views(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """([1 + P, 3, S, S] f32 preprocessed views, the image's (height, width))."""
        pixels = rgb_pixels(load_image(image))
        views = anyres_views(pixels, self.processor_pinpoints, self.tile, self.base_size, self.processor.resample)
        return np.stack([preprocess_pixels(view, self.processor) for view in views]), pixels.shape[1:]

    def encode_images(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        per_image = [self.image_views(image) for image in images]
        projected = self.image_features(np.concatenate([views for views, _ in per_image]))
        features, first = [], 0
        for views, (height, width) in per_image:
            chunk = projected[first:first + len(views)]
            first += len(views)
            features.append(pack_features(chunk, height, width, self.model_pinpoints, self.config.vision.image_size,
                                          self.grid, self.image_newline))
        return features, [views for views, _ in per_image]
