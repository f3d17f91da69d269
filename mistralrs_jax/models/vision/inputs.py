"""What a vision model hands the engine for one request: image feature rows and the prompt
positions they replace (`MultiModalInputs`), plus a digest of the images for the prefix cache.

The engine (engine/multimodal.py) turns these into each step's embedding override; the type
lives here, with the models that build it, so nothing in models/ imports the engine.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MultiModalInputs:
    """Per-request image features: `embeds[i]` replaces the embedding of prompt position `positions[i]`."""

    positions: np.ndarray  # [M] int, ascending prompt positions of the placeholder tokens
    embeds: np.ndarray  # [M, hidden] f32
    num_images: int = 0
    # Names the image contents: part of the prefix-cache hash chain, so cached KV computed
    # with other images (behind the same placeholder tokens) is never shared.
    cache_salt: str = field(default="")

    def __post_init__(self):
        self.positions = np.asarray(self.positions, np.int64)
        self.embeds = np.asarray(self.embeds, np.float32)
        if self.positions.shape[0] != self.embeds.shape[0]:
            raise ValueError(f"{self.positions.shape[0]} image positions but {self.embeds.shape[0]} feature rows")

    def rows_in(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in [start, stop), their feature rows)."""
        lo, hi = np.searchsorted(self.positions, [start, stop])
        return self.positions[lo:hi], self.embeds[lo:hi]


def image_cache_salt(pixel_arrays: list[np.ndarray]) -> str:
    """A digest of the preprocessed pixels of every image, in order."""
    digest = hashlib.sha256()
    for pixels in pixel_arrays:
        array = np.ascontiguousarray(pixels, np.float32)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return "images:" + digest.hexdigest()
