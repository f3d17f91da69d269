"""Quantized weights: GGML block formats (pack/unpack) and their int8 affine form."""

from .formats import (
    GGML_TYPES,
    QTYPES,
    AffineInt8,
    dequantize,
    ggml_type,
    nbytes,
    qtype_name,
    quantize,
    to_affine_int8,
)

__all__ = [
    "GGML_TYPES",
    "QTYPES",
    "AffineInt8",
    "dequantize",
    "ggml_type",
    "nbytes",
    "qtype_name",
    "quantize",
    "to_affine_int8",
]
