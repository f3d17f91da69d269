"""Random but valid weight blocks of every format the kernel takes, for its tests and benchmarks.

Random bytes are valid codes in every supported format except in their float scale fields,
where they could spell inf or NaN; those fields are overwritten with finite scales (and HQQ's
zero points with values within the code range, as HQQ's optimiser leaves them).
"""

from __future__ import annotations

import numpy as np

# The kernel's ids of this project's HQQ layouts (quant/hqq.py), which GGML has no id for:
# outside GGML's range, and the same numbers as unpack.h's MJ_FORMATS.
HQQ_TYPE_IDS: dict[str, int] = {"HQQ4": 1004, "HQQ8": 1008}

# kernel type id (gguf-py's GGMLQuantizationType id, or HQQ_TYPE_IDS) ->
# (elements per block, bytes per block, byte offsets of f16 fields)
LAYOUTS: dict[int, tuple[int, int, tuple[int, ...]]] = {
    2: (32, 18, (0,)),  # Q4_0: d, qs[16]
    3: (32, 20, (0, 2)),  # Q4_1: d, m, qs[16]
    6: (32, 22, (0,)),  # Q5_0: d, qh[4], qs[16]
    7: (32, 24, (0, 2)),  # Q5_1: d, m, qh[4], qs[16]
    8: (32, 34, (0,)),  # Q8_0: d, qs[32]
    9: (32, 36, (0, 2)),  # Q8_1: d, s, qs[32]
    10: (256, 84, (80, 82)),  # Q2_K: scales[16], qs[64], d, dmin
    11: (256, 110, (108,)),  # Q3_K: hmask[32], qs[64], scales[12], d
    12: (256, 144, (0, 2)),  # Q4_K: d, dmin, scales[12], qs[128]
    13: (256, 176, (0, 2)),  # Q5_K: d, dmin, scales[12], qh[32], qs[128]
    14: (256, 210, (208,)),  # Q6_K: ql[128], qh[64], scales[16], d
    15: (256, 292, ()),  # Q8_K: d (f32), qs[256], bsums[16] (F32_FIELDS)
    20: (32, 18, (0,)),  # IQ4_NL: d, qs[16]
    23: (256, 136, (0,)),  # IQ4_XS: d, scales_h, scales_l[4], qs[128]
    1004: (64, 36, (0,)),  # HQQ4: scale, zero (ZERO_POINTS), qs[32]
    1008: (64, 68, (0,)),  # HQQ8: scale, zero (ZERO_POINTS), qs[64]
}
F32_FIELDS: dict[int, tuple[int, ...]] = {15: (0,)}  # byte offsets of f32 scales
ZERO_POINTS: dict[int, tuple[int, float]] = {1004: (2, 15.0), 1008: (2, 255.0)}  # f16 zero at, largest code


def random_blocks(qtype: int, n_rows: int, k: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """uint8 (n_rows, k // block * bytes): random codes, f16 scales of magnitude ~`scale`."""
    block, nbytes, f16_at = LAYOUTS[qtype]
    if k % block:
        raise ValueError(f"k={k} is not a multiple of the type's {block}-element blocks")
    blocks = rng.integers(0, 256, size=(n_rows * (k // block), nbytes), dtype=np.uint8)
    for at in f16_at:
        d = (rng.uniform(0.5, 1.5, size=blocks.shape[0]) * scale * rng.choice([-1, 1], size=blocks.shape[0]))
        blocks[:, at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    for at in F32_FIELDS.get(qtype, ()):
        d = rng.uniform(0.5, 1.5, size=blocks.shape[0]) * scale * rng.choice([-1, 1], size=blocks.shape[0])
        blocks[:, at : at + 4] = d.astype(np.float32).view(np.uint8).reshape(-1, 4)
    if qtype in ZERO_POINTS:
        at, top = ZERO_POINTS[qtype]
        zero = rng.uniform(0.0, top, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at : at + 2] = zero.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)
