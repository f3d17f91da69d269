"""A packed quantized weight: the value object quant/ hands to the model layers.

`PackedWeight` is a projection [out, in] held at its format's own bits per weight, as uint8
[out, row_bytes]: each output row is a run of blocks, each block the format's bytes exactly
as ggml lays them out (a GGUF tensor's rows, unchanged), or this project's HQQ4/HQQ8 layout
(hqq.py). This is the layout every kernel reads (pallas_kernels/quant_matmul.py): the Pallas
GPU kernel, the CPU FFI kernel and the XLA reference.

Sources: `from_gguf` wraps a GGUF tensor's bytes (a view of the memory map, no f32 copy);
`quantize_packed` quantizes f32 rows (ISQ) to the same bytes, with llama.cpp's quantizers
(formats.quantize) or HQQ.

Formats (bits per weight): Q4_0 4.5, Q4_1 5, Q5_0 5.5, Q5_1 6, Q8_0 8.5, Q8_1 9, Q2_K 2.625,
Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625, Q8_K 9.125, IQ4_NL 4.5, IQ4_XS 4.25,
HQQ4 4.5, HQQ8 8.5. Other GGUF types (IQ1/IQ2/IQ3, TQ, MXFP4, NVFP4) have no packed kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import NotSupportedError
from .formats import QTYPES, dequantize, quantize
from .hqq import HQQ_BLOCK_BYTES, HQQ_GROUP_SIZE, hqq_pack, hqq_quantize, hqq_unpack

# Kept equal to pallas_kernels.quant_blocks.FORMATS by a test (quant/ does not import the kernels).
PACKED_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                 "Q8_K", "IQ4_NL", "IQ4_XS", "HQQ4", "HQQ8")
HQQ_BITS = {"HQQ4": 4, "HQQ8": 8}
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


def block_geometry(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a packed format."""
    if qtype in HQQ_BITS:
        return HQQ_GROUP_SIZE, HQQ_BLOCK_BYTES[HQQ_BITS[qtype]]
    return QTYPES[qtype]


@dataclass(frozen=True)
class PackedWeight:
    blocks: np.ndarray  # uint8 [out, in // block_elems * type_size]
    qtype: str
    in_features: int

    def __post_init__(self):
        if self.qtype not in PACKED_TYPES:
            raise NotSupportedError(f"{self.qtype} has no packed layout; packed formats: {', '.join(PACKED_TYPES)}")
        block_elems, type_size = block_geometry(self.qtype)
        expected = self.in_features // block_elems * type_size
        if (self.blocks.dtype != np.uint8 or self.blocks.ndim != 2 or self.in_features % block_elems
                or self.blocks.shape[1] != expected):
            raise NotSupportedError(f"a {self.qtype} weight with {self.in_features} input features is uint8 "
                                    f"[out, {expected}]; got {self.blocks.dtype} {self.blocks.shape}")

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.out_features * self.in_features)

    def map_rows(self, transform: Callable[[np.ndarray], np.ndarray] | None) -> "PackedWeight":
        """The same weight with its output rows re-ordered by `transform` (a row permutation
        such as llama.cpp's Q/K un-permutation moves whole rows of blocks)."""
        if transform is None:
            return self
        return PackedWeight(np.ascontiguousarray(transform(self.blocks)), self.qtype, self.in_features)

    def dequantize(self) -> np.ndarray:
        """f32 [out, in] (numpy; the same values the kernels compute with)."""
        if self.qtype in HQQ_BITS:
            return hqq_unpack(self.blocks, HQQ_BITS[self.qtype], self.in_features)
        return dequantize(self.blocks, self.qtype, (self.out_features, self.in_features))


def from_gguf(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> PackedWeight:
    """A 2-D GGUF tensor's bytes (numpy shape [out, in]) as a PackedWeight, without a copy."""
    if len(shape) != 2:
        raise NotSupportedError(f"a packed weight is 2-D [out, in]; got shape {tuple(shape)}")
    out_f, in_f = (int(s) for s in shape)
    return PackedWeight(np.asarray(data, np.uint8).reshape(out_f, -1), qtype, in_f)


def quantize_packed(w: np.ndarray, qtype: str) -> PackedWeight:
    """f32 rows [out, in] quantized to `qtype`'s packed bytes (llama.cpp's quantizers; HQQ for HQQ4/8)."""
    values = np.asarray(w, np.float32)
    if qtype in HQQ_BITS:
        blocks = hqq_pack(hqq_quantize(values, HQQ_BITS[qtype], HQQ_GROUP_SIZE))
    else:
        blocks = quantize(values, qtype)
    return PackedWeight(np.ascontiguousarray(blocks, np.uint8), qtype, int(values.shape[1]))


CPU_WEIGHT_MODES = ("quantized", "f32")
"""How a quantized GGUF projection is held: "quantized" packed at the file's own bits (the
default on every backend), "f32" dequantized once at load (`--cpu-weights f32`)."""


def gguf_projection(gguf, name: str, cpu_weights: str = "quantized") -> PackedWeight | None:
    """A GGUF projection as a PackedWeight, or None where it is held dense: float sources, or
    `cpu_weights="f32"`. A quantized type with no packed kernel is refused by name (never a
    silent f32 blow-up): the message gives the flag that dequantizes it instead."""
    if cpu_weights not in CPU_WEIGHT_MODES:
        raise NotSupportedError(f"cpu_weights must be one of {', '.join(CPU_WEIGHT_MODES)}, got {cpu_weights!r}")
    tensor = gguf.tensor(name)
    if tensor.qtype in FLOAT_TYPES or cpu_weights == "f32":
        return None
    if tensor.qtype not in PACKED_TYPES or len(tensor.shape) != 2:
        f32_bytes = 4 * int(np.prod(tensor.shape))
        raise NotSupportedError(
            f"{getattr(gguf, 'path', 'the model')}: tensor {name!r} is {tensor.qtype}, which has no quantized matmul "
            f"kernel (packed formats: {', '.join(PACKED_TYPES)}); load the model with --cpu-weights f32 "
            f"(cpu_weights='f32') to dequantize it at load ({f32_bytes} bytes for this tensor as f32)")
    return from_gguf(tensor.data, tensor.qtype, tensor.shape)


def dequantized_bytes(gguf) -> int:
    """Bytes the quantized tensors of a GGUF file take once dequantized to f32."""
    total = 0
    for name in gguf.tensor_names:
        tensor = gguf.tensor(name)
        if tensor.qtype not in FLOAT_TYPES:
            total += 4 * int(np.prod(tensor.shape))
    return total
