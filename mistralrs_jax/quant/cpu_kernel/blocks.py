"""Random but valid GGML weight blocks, for the kernel's tests and benchmarks.

Random bytes are valid codes in every supported format except in their f16 scale fields,
where they could spell inf or NaN; those fields are overwritten with finite scales.
"""

from __future__ import annotations

import numpy as np

# gguf-py type id -> (elements per block, bytes per block, byte offsets of f16 fields)
LAYOUTS: dict[int, tuple[int, int, tuple[int, ...]]] = {
    2: (32, 18, (0,)),  # Q4_0: d, qs[16]
    3: (32, 20, (0, 2)),  # Q4_1: d, m, qs[16]
    6: (32, 22, (0,)),  # Q5_0: d, qh[4], qs[16]
    7: (32, 24, (0, 2)),  # Q5_1: d, m, qh[4], qs[16]
    8: (32, 34, (0,)),  # Q8_0: d, qs[32]
    10: (256, 84, (80, 82)),  # Q2_K: scales[16], qs[64], d, dmin
    11: (256, 110, (108,)),  # Q3_K: hmask[32], qs[64], scales[12], d
    12: (256, 144, (0, 2)),  # Q4_K: d, dmin, scales[12], qs[128]
    13: (256, 176, (0, 2)),  # Q5_K: d, dmin, scales[12], qh[32], qs[128]
    14: (256, 210, (208,)),  # Q6_K: ql[128], qh[64], scales[16], d
    20: (32, 18, (0,)),  # IQ4_NL: d, qs[16]
    23: (256, 136, (0,)),  # IQ4_XS: d, scales_h, scales_l[4], qs[128]
}


def random_blocks(qtype: int, n_rows: int, k: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """uint8 (n_rows, k // block * bytes): random codes, f16 scales of magnitude ~`scale`."""
    block, nbytes, f16_at = LAYOUTS[qtype]
    if k % block:
        raise ValueError(f"k={k} is not a multiple of the type's {block}-element blocks")
    blocks = rng.integers(0, 256, size=(n_rows * (k // block), nbytes), dtype=np.uint8)
    for at in f16_at:
        d = (rng.uniform(0.5, 1.5, size=blocks.shape[0]) * scale * rng.choice([-1, 1], size=blocks.shape[0]))
        blocks[:, at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)
