"""Quantized weights: GGML block formats (pack/unpack), packed weights, HQQ, and
in-situ quantization (ISQ) of a model while it loads, with its disk cache."""

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
from .hqq import HQQWeights, hqq_dequantize, hqq_quantize, hqq_to_affine_int8
from .packed import PACKED_TYPES, PackedWeight, from_gguf, gguf_projection, quantize_packed
from .isq import ISQ_TYPES, ISQFactory, normalize_isq_type, quantize_weight, wrap_factory
from .isq_cache import isq_cache_key, load_isq_cache, save_isq_cache

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
    "HQQWeights",
    "hqq_dequantize",
    "hqq_quantize",
    "hqq_to_affine_int8",
    "PACKED_TYPES",
    "PackedWeight",
    "from_gguf",
    "gguf_projection",
    "quantize_packed",
    "ISQ_TYPES",
    "ISQFactory",
    "normalize_isq_type",
    "quantize_weight",
    "wrap_factory",
    "isq_cache_key",
    "load_isq_cache",
    "save_isq_cache",
]
