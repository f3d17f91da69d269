"""Phi-3 Vision image preprocessing (the published `Phi3VImageProcessor`) and its token counts.

An image becomes a high-resolution ("HD") canvas cut into square crops plus one global view:

1. RGB; an image taller than wide is transposed so the long edge is horizontal;
2. the crop grid: the largest `scale` with `scale * ceil(scale / ratio) <= num_crops`
   (ratio = width / height), the image resized (PIL bilinear, as torchvision does on PIL
   images) to width `scale * crop` and height `int(width / ratio)`;
3. padded with white, above and below, to a multiple of the crop size (the extra row of
   padding, when odd, goes below); transposed back when step 1 transposed it;
4. rescaled to [0, 1] and normalized (CLIP mean and std), f32;
5. the global view: the normalized canvas resized to one crop with bicubic interpolation on
   the normalized values (torch `interpolate(mode="bicubic")`, no antialiasing);
6. the crops, row by row, after the global view.

With a crop of 336 px and a 24 x 24 patch grid merged 2 x 2 into 12 x 12, an H x W canvas
(h = H // 336 crop rows, w = W // 336 columns) is `(h * w + 1) * 144 + 1 + (h + 1) * 12`
image tokens: every crop's and the global view's 144 merged patches, one separator between
the crops and the global view, and a row separator ending each of the h * 12 crop rows and
the global view's 12 rows.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import ImageError, ModelLoadError
from .image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PREPROCESSOR_CONFIG_FILE, \
    read_image_processor_config, resize_pixels, rgb_pixels

log = logging.getLogger(__name__)

PIL_BILINEAR = 2
PAD_VALUE = 255  # the HD canvas is padded with white
CUBIC_A = -0.75  # torch's bicubic kernel coefficient


@dataclass(frozen=True)
class Phi3VImageProcessor:
    """The fields of `preprocessor_config.json` that decide Phi-3 Vision's pixels (its defaults)."""

    num_crops: int = 1
    crop_size: int = 336
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, raw: dict[str, Any], crop_size: int = 336) -> "Phi3VImageProcessor":
        num_crops = raw.get("num_crops", 1)
        if not isinstance(num_crops, int) or isinstance(num_crops, bool) or num_crops < 1:
            raise ModelLoadError(f"{PREPROCESSOR_CONFIG_FILE}: num_crops must be a positive integer, got {num_crops!r}")
        return cls(num_crops=num_crops, crop_size=crop_size,
                   image_mean=tuple(float(x) for x in raw.get("image_mean") or OPENAI_CLIP_MEAN),
                   image_std=tuple(float(x) for x in raw.get("image_std") or OPENAI_CLIP_STD))

    @classmethod
    def from_model_dir(cls, model_dir: str, crop_size: int = 336) -> "Phi3VImageProcessor":
        raw = read_image_processor_config(model_dir)
        if raw is None:
            log.warning("%s has no image processor config (%s); using Phi-3 Vision's defaults (num_crops 1)",
                        model_dir, PREPROCESSOR_CONFIG_FILE)
            raw = {}
        return cls.from_dict(raw, crop_size)

    # -- geometry ---------------------------------------------------------------------

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to before padding (in its own orientation)."""
        transposed = width < height
        if transposed:
            width, height = height, width
        ratio = width / height
        scale = 1
        while scale * math.ceil(scale / ratio) <= self.num_crops:
            scale += 1
        scale -= 1
        new_width = int(scale * self.crop_size)
        new_height = int(new_width / ratio)
        return (new_height, new_width) if transposed else (new_width, new_height)

    def hd_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the padded HD canvas: both multiples of the crop size."""
        new_width, new_height = self.resized_size(width, height)
        crop = self.crop_size
        if width < height:
            return int(math.ceil(new_width / crop) * crop), new_height
        return new_width, int(math.ceil(new_height / crop) * crop)

    def crop_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of crops of an image this size; ImageError for one too thin to resize."""
        if min(width, height) < 1 or min(self.resized_size(width, height)) < 1:
            raise ImageError(f"a {width}x{height} image is too thin for Phi-3 Vision's HD transform: its short edge "
                             "would shrink to nothing; send a less elongated image")
        hd_width, hd_height = self.hd_size(width, height)
        return hd_height // self.crop_size, hd_width // self.crop_size

    # -- pixels -----------------------------------------------------------------------

    def hd_canvas(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [3, H, W] -> the resized, white-padded uint8 [3, h * crop, w * crop] canvas."""
        _, height, width = pixels.shape
        transposed = width < height
        if transposed:
            pixels = pixels.transpose(0, 2, 1)
        self.crop_grid(width, height)  # refuses an image too thin to resize
        new_width, new_height = self.resized_size(*pixels.shape[:0:-1])
        resized = resize_pixels(pixels, new_height, new_width, PIL_BILINEAR)
        target = int(math.ceil(new_height / self.crop_size) * self.crop_size)
        top = (target - new_height) // 2
        canvas = np.full((pixels.shape[0], target, new_width), PAD_VALUE, np.uint8)
        canvas[:, top:top + new_height] = resized
        return canvas.transpose(0, 2, 1) if transposed else canvas

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [3, H, W] -> f32 (x / 255 - mean) / std."""
        values = pixels.astype(np.float32) / np.float32(255)
        mean = np.asarray(self.image_mean, np.float32)[:, None, None]
        std = np.asarray(self.image_std, np.float32)[:, None, None]
        return (values - mean) / std

    def views(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """A PIL image -> (f32 [1 + h * w, 3, crop, crop]: the global view then the crops row by row,
        (h, w) the crop grid)."""
        canvas = self.normalize(self.hd_canvas(rgb_pixels(image)))
        crop = self.crop_size
        rows, cols = canvas.shape[1] // crop, canvas.shape[2] // crop
        crops = canvas.reshape(3, rows, crop, cols, crop).transpose(1, 3, 0, 2, 4).reshape(-1, 3, crop, crop)
        global_view = bicubic_resize(canvas, crop, crop)
        return np.concatenate([global_view[None], crops]).astype(np.float32), (rows, cols)


def num_image_tokens(rows: int, cols: int, merged_grid: int) -> int:
    """Image tokens of a rows x cols crop grid whose crops each become merged_grid^2 rows."""
    return (rows * cols + 1) * merged_grid ** 2 + 1 + (rows + 1) * merged_grid


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[n] fractional offsets -> [n, 4] weights of the samples at floor - 1 .. floor + 2."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([out, 4] source indices, [out, 4] weights) of torch's bicubic resampling along one axis
    (align_corners=False, edge samples repeated)."""
    # torch computes the scale in f32 and the source position as one fused multiply-add rounded
    # to f32 (exact in f64, then rounded once); another rounding moves the taps.
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    floor = np.floor(source)
    index = np.clip(floor.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return index, _cubic_weights(source - floor).astype(np.float32)


def bicubic_resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """f32 [C, H, W] -> [C, height, width], as torch's `interpolate(mode="bicubic")` computes it:
    4 taps per output row, then 4 per output column."""
    index, weights = _bicubic_taps(values.shape[1], height)
    rows = np.einsum("cokw,ok->cow", values.astype(np.float32)[:, index], weights)
    index, weights = _bicubic_taps(values.shape[2], width)
    return np.einsum("chok,ok->cho", rows[:, :, index], weights).astype(np.float32)
