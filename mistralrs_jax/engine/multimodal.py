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

import numpy as np

from ..models.vision.inputs import MultiModalInputs


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
