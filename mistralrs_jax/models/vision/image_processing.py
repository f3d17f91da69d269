"""Images in, pixel arrays out: loading (data URLs, local files, http(s)) and CLIP preprocessing.

Preprocessing follows the checkpoint's `preprocessor_config.json` the way transformers'
CLIP/LLaVA image processors (PIL backend) do, step by step, so the pixels are the same:

1. convert to RGB (transparency composited onto white);
2. LLaVA 1.5's "pad" aspect ratio: pad to a square with the mean colour (`do_pad`, or
   `image_aspect_ratio: "pad"` in an original-format config), the image centred;
3. resize with PIL (bicubic by default): the shortest edge to `size.shortest_edge`, the
   other edge `int(shortest * long / short)`; or to an exact `size.height x size.width`;
4. center crop to `crop_size` (zero padding where the image is smaller);
5. rescale (x * 1/255, computed in f64 and stored as f32) and normalize ((x - mean) / std, f32).

The result is channels-first f32 [3, H, W], one array per image.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ImageError, ModelLoadError
from ...json_files import read_json_object

log = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3

# Downloads: an image URL must answer within this many seconds and stay under this size.
IMAGE_FETCH_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 32 << 20
# Decompression bombs: an image may declare at most this many pixels (checked from its header,
# before anything is decoded). 40 MP is far above what any vision encoder here takes in.
MAX_IMAGE_PIXELS = 40_000_000


def _size_dict(value: Any, default: dict[str, int]) -> dict[str, int]:
    """transformers writes sizes as {"shortest_edge": n}, {"height": h, "width": w}, or (older files) an int."""
    if value is None:
        return dict(default)
    if isinstance(value, int):
        return {"shortest_edge": value} if "shortest_edge" in default else {"height": value, "width": value}
    if isinstance(value, dict):
        return {key: int(v) for key, v in value.items() if v is not None}
    raise ModelLoadError(f"{PREPROCESSOR_CONFIG_FILE}: a size should be an int or an object, got {value!r}")


def read_image_processor_config(model_dir: str) -> dict[str, Any] | None:
    """The checkpoint's image preprocessing settings: `preprocessor_config.json`, or the
    "image_processor" object transformers 5 nests in `processor_config.json`; None when neither has one."""
    path = os.path.join(model_dir, PREPROCESSOR_CONFIG_FILE)
    if os.path.isfile(path):
        return read_json_object(path)
    nested = read_json_object(os.path.join(model_dir, PROCESSOR_CONFIG_FILE), missing_ok=True).get("image_processor")
    return nested if isinstance(nested, dict) else None


@dataclass
class ImageProcessorConfig:
    """The fields of `preprocessor_config.json` that decide the pixels (CLIPImageProcessor's defaults)."""

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = PIL_BICUBIC
    do_center_crop: bool = True
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_pad: bool = False  # LLaVA 1.5: pad to a square with the mean colour before resizing
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # LLaVA-NeXT's tiling resolutions (height, width)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ImageProcessorConfig":
        defaults = cls()
        config = cls(
            do_resize=bool(raw.get("do_resize", True)),
            size=_size_dict(raw.get("size"), defaults.size),
            resample=int(raw.get("resample", PIL_BICUBIC)),
            do_center_crop=bool(raw.get("do_center_crop", True)),
            crop_size=_size_dict(raw.get("crop_size"), defaults.crop_size),
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=tuple(float(x) for x in raw.get("image_mean") or OPENAI_CLIP_MEAN),
            image_std=tuple(float(x) for x in raw.get("image_std") or OPENAI_CLIP_STD),
            # LlavaImageProcessor's do_pad is LLaVA 1.5's pad-to-square; LLaVA-NeXT's means something else.
            do_pad=bool(raw.get("do_pad", False)) and str(raw.get("image_processor_type", "")).startswith("LlavaImage"),
            image_grid_pinpoints=[(int(h), int(w)) for h, w in raw["image_grid_pinpoints"]]
            if raw.get("image_grid_pinpoints") else None,
        )
        if "shortest_edge" not in config.size and not {"height", "width"} <= set(config.size):
            raise ModelLoadError(f"{PREPROCESSOR_CONFIG_FILE}: size {config.size} is not supported "
                                 "(expected shortest_edge, or height and width)")
        if config.do_center_crop and not {"height", "width"} <= set(config.crop_size):
            raise ModelLoadError(f"{PREPROCESSOR_CONFIG_FILE}: crop_size {config.crop_size} needs height and width")
        return config

    @classmethod
    def from_model_dir(cls, model_dir: str, pad_to_square: bool = False) -> "ImageProcessorConfig":
        """The checkpoint's preprocessor config; `pad_to_square` forces LLaVA's "pad" aspect ratio on."""
        raw = read_image_processor_config(model_dir)
        if raw is None:
            log.warning("%s has no image processor config (%s); using CLIP's default preprocessing", model_dir,
                        PREPROCESSOR_CONFIG_FILE)
            raw = {}
        config = cls.from_dict(raw)
        config.do_pad = config.do_pad or pad_to_square
        return config

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        raise ModelLoadError("images resized by their shortest edge without a center crop have no fixed size; "
                             "this preprocessor config is not supported")


# --------------------------------------------------------------------------- preprocessing


def to_rgb(image):
    """RGB, with any transparency composited onto a white background (as transformers does)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(pixels: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """[C, H, W] uint8 centred on a square canvas of the longer edge, filled with `fill` per channel."""
    channels, height, width = pixels.shape
    if height == width:
        return pixels
    side = max(height, width)
    canvas = np.empty((channels, side, side), pixels.dtype)
    canvas[:] = np.asarray(fill, pixels.dtype)[:, None, None]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top:top + height, left:left + width] = pixels
    return canvas


def resized_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """(height, width) after resizing: the shortest edge to `shortest_edge` (the other scaled and
    truncated), or exactly height x width."""
    if "shortest_edge" in size:
        target = size["shortest_edge"]
        short, long = min(height, width), max(height, width)
        scaled = int(target * long / short)
        return (scaled, target) if width <= height else (target, scaled)
    return size["height"], size["width"]


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred height x width window of [C, H, W]; zero-padded where the image is smaller."""
    _, rows, cols = pixels.shape
    if rows < height or cols < width:
        padded_rows, padded_cols = max(rows, height), max(cols, width)
        canvas = np.zeros(pixels.shape[:1] + (padded_rows, padded_cols), pixels.dtype)
        pad_top, pad_left = -(-(padded_rows - rows) // 2), -(-(padded_cols - cols) // 2)
        canvas[:, pad_top:pad_top + rows, pad_left:pad_left + cols] = pixels
        top, left = (rows - height) // 2 + pad_top, (cols - width) // 2 + pad_left
        return canvas[:, max(0, top):top + height, max(0, left):left + width]
    top, left = (rows - height) // 2, (cols - width) // 2
    return pixels[:, top:top + height, left:left + width]


def rgb_pixels(image) -> np.ndarray:
    """A PIL image as uint8 [3, H, W] RGB."""
    return np.moveaxis(np.asarray(to_rgb(image)), -1, 0)


def resize_pixels(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [3, H, W] resized with PIL (what transformers' PIL backend does)."""
    from PIL import Image

    resized = Image.fromarray(np.moveaxis(pixels, 0, -1)).resize((width, height), resample=resample)
    return np.moveaxis(np.asarray(resized), -1, 0)


def preprocess_image(image, config: ImageProcessorConfig) -> np.ndarray:
    """One PIL image -> f32 [3, H, W] as the model's image processor would make it."""
    pixels = rgb_pixels(image)
    if config.do_pad:
        pixels = pad_to_square(pixels, tuple(int(m * 255) for m in config.image_mean))
    return preprocess_pixels(pixels, config)


def preprocess_pixels(pixels: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 [3, H, W] -> f32 [3, h, w]: resize, center crop, rescale, normalize (steps 3-5 above)."""
    if config.do_resize:
        pixels = resize_pixels(pixels, *resized_shape(pixels.shape[1], pixels.shape[2], config.size), config.resample)
    if config.do_center_crop:
        pixels = center_crop(pixels, config.crop_size["height"], config.crop_size["width"])
    values = pixels.astype(np.float32)
    if config.do_rescale:
        values = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, np.float32)[:, None, None]
        std = np.asarray(config.image_std, np.float32)[:, None, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


# --------------------------------------------------------------------------- loading


def _open_image_bytes(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    unreadable = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except unreadable as exc:
        raise _unreadable(where, exc) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{where} declares {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} this "
                         "server decodes; send a smaller image")
    try:
        image.load()  # decode now, so a truncated file fails here and not inside the engine
    except unreadable as exc:
        raise _unreadable(where, exc) from None
    return image


def _unreadable(where: str, exc: Exception) -> ImageError:
    return ImageError(f"{where} is not a readable image ({type(exc).__name__}: {exc}); send a PNG, JPEG, "
                      "GIF, WebP or BMP file")


def _decode_data_url(url: str):
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError("an image data URL must look like data:image/png;base64,<data>")
    if not header.endswith(";base64"):
        raise ImageError("image data URLs must be base64-encoded (data:image/...;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URL holds invalid base64") from None
    return _open_image_bytes(data, "the image data URL")


def _fetch_url(url: str, timeout: float):
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise ImageError(f"the image at {url} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
                chunks.append(chunk)
    except httpx.HTTPStatusError as exc:
        raise ImageError(f"fetching the image {url} failed: HTTP {exc.response.status_code}") from None
    except httpx.HTTPError as exc:
        raise ImageError(f"fetching the image {url} failed ({type(exc).__name__}: {exc}); check the URL, or send "
                         "the image inline as a data URL") from None
    return _open_image_bytes(b"".join(chunks), url)


def check_image_source(source: Any, local_images: bool | str) -> None:
    """Refuse a local path / file:// image unless `local_images` allows it: True allows any
    path (the Python API), False none (the server's default: a client must not make the
    server read its files), a directory only paths inside it (`--allowed-local-media-path`)."""
    if not isinstance(source, (str, os.PathLike)) or local_images is True:
        return
    text = os.fspath(source).strip()
    if text.startswith(("data:", "http://", "https://")):
        return
    path = text[len("file://"):] if text.startswith("file://") else text
    if local_images is False:
        raise ImageError(f"the image {text[:80]!r} is a local path, which this server does not read: send the image as "
                         "a data URL or an http(s) URL (or start the server with --allowed-local-media-path DIR)")
    root = os.path.realpath(local_images)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ImageError(f"the image {text[:80]!r} is outside the directory this server reads local images from "
                         "(--allowed-local-media-path); send it as a data URL instead")


def load_image(source: Any, timeout: float = IMAGE_FETCH_TIMEOUT_S):
    """A PIL image from a PIL image, raw bytes, a data: URL, an http(s) URL, a file:// URL or a local path.

    Raises ImageError (a 400 for the server) with what went wrong."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return _open_image_bytes(bytes(source), "the image bytes")
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"an image must be a URL, a path or a PIL image, got {type(source).__name__}")
    text = os.fspath(source).strip()
    if text.startswith("data:"):
        return _decode_data_url(text)
    if text.startswith(("http://", "https://")):
        return _fetch_url(text, timeout)
    path = text[len("file://"):] if text.startswith("file://") else text
    if "://" in path:
        raise ImageError(f"image URL scheme of {text[:40]!r} is not supported: use data:, http(s):// or a path")
    if not os.path.isfile(path):
        raise ImageError(f"the image {path!r} is not a file this server can read; send it as a data URL instead")
    with open(path, "rb") as handle:
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image {path!r} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return _open_image_bytes(data, path)
