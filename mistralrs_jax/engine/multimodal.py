"""Image features riding along a sequence, and the per-step embedding override built from them.

A vision-language request's prompt holds one placeholder token per image feature row (LLaVA:
576 `<image>` tokens per 336-px image). The features are computed once, when the request is
added (the vision tower runs outside the token step), and kept on the host with the prompt
positions they replace. Each step that runs some of those positions gets an extra
[T_padded, hidden] array plus a [T_padded] mask, in the step's flat token order, and the
model takes the feature row instead of the token embedding where the mask is set. Prefill
chunks may split an image anywhere: a chunk takes exactly the rows of the positions it runs.
Steps that touch no image position (decodes, text-only batches) get nothing and run the
unchanged text-only step.
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


def step_input_embeds(runs: list[tuple[MultiModalInputs | None, int, int]], num_tokens_padded: int,
                      hidden_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The step's (embeds [T, hidden] f32, mask [T] bool), or None when no run covers an image position.

    `runs` lists, in the step's flat token order, each sequence's (multimodal inputs or None,
    first position run, number of tokens run)."""
    if all(mm is None for mm, _, _ in runs):
        return None
    embeds = mask = None
    offset = 0
    for mm, start, count in runs:
        if mm is not None:
            positions, rows = mm.rows_in(start, start + count)
            if positions.size:
                if embeds is None:
                    embeds = np.zeros((num_tokens_padded, hidden_size), np.float32)
                    mask = np.zeros(num_tokens_padded, bool)
                flat = offset + (positions - start)
                embeds[flat] = rows
                mask[flat] = True
        offset += count
    return None if embeds is None else (embeds, mask)
