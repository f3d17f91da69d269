"""llama.cpp's own C functions for GGML block formats, from the libggml-base shipped inside
llama-cpp-python (the `peers` extra), through ctypes: the referee for every dequantizer and
quantizer in mistralrs_jax.quant.

- dequantize: `dequantize_row_<type>` (every block type; `ggml_fp16_to_fp32_row` and
  `ggml_bf16_to_fp32_row` for the float types);
- quantize: `ggml_quantize_chunk`, what llama-quantize writes without an importance matrix,
  and the row reference quantizers `quantize_row_<type>_ref` of the activation types Q8_K/Q8_1.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from peers import missing_peer

from mistralrs_jax.quant import nbytes

F32 = np.float32
_LIBRARY_NAMES = ["libggml-base.so", "libggml-base.dylib", "libggml.so", "libllama.so"]
_FLOAT_ROW_DECODERS = {"F16": "ggml_fp16_to_fp32_row", "BF16": "ggml_bf16_to_fp32_row"}


def _ggml_symbol_suffix(name: str) -> str:
    # ggml spells its types in lower case except the K of the K-quants: q4_K, iq4_nl.
    return name.lower().replace("_k", "_K")


class LibGGML:
    """llama.cpp's ggml-base as shipped inside llama-cpp-python."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            missing_peer("llama-cpp-python (the `peers` extra) is not installed; it carries llama.cpp's reference "
                         "quantizers")
        libdir = Path(spec.submodule_search_locations[0]) / "lib"
        paths = [libdir / n for n in _LIBRARY_NAMES if (libdir / n).exists()]
        if not paths:
            missing_peer(f"llama-cpp-python is installed but no ggml shared library was found in {libdir}")
        self.lib = ctypes.CDLL(str(paths[0]))
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,  # type, src, dst
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,  # start, nrows, n_per_row, imatrix
        ]
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t

    def _row_function(self, symbol: str):
        fn = getattr(self.lib, symbol)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        return fn

    def has_dequantize(self, name: str) -> bool:
        return name in _FLOAT_ROW_DECODERS or hasattr(self.lib, f"dequantize_row_{_ggml_symbol_suffix(name)}")

    def quantize(self, x: np.ndarray, name: str) -> np.ndarray:
        """What llama-quantize writes (no importance matrix): ggml_quantize_chunk; the
        activation types Q8_K/Q8_1 only have their row reference quantizer."""
        x = np.ascontiguousarray(x, dtype=F32)
        out = np.zeros(nbytes(name, x.shape), dtype=np.uint8)
        if name in ("Q8_K", "Q8_1"):
            self._row_function(f"quantize_row_{_ggml_symbol_suffix(name)}_ref")(x.ctypes.data, out.ctypes.data, x.size)
        else:
            self.lib.ggml_quantize_chunk(
                int(GGMLQuantizationType[name]), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None
            )
        return out.reshape(x.shape[0], -1)

    def dequantize(self, raw: np.ndarray, name: str, count: int) -> np.ndarray:
        """`count` f32 values decoded from `raw` (blocks of type `name`) by ggml."""
        out = np.empty(count, dtype=F32)
        raw = np.ascontiguousarray(raw)
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8)
        symbol = _FLOAT_ROW_DECODERS.get(name, f"dequantize_row_{_ggml_symbol_suffix(name)}")
        self._row_function(symbol)(raw.ctypes.data, out.ctypes.data, count)
        return out


@functools.lru_cache(maxsize=1)
def _loaded() -> LibGGML:
    return LibGGML()


def libggml() -> LibGGML:
    """The library, loaded once (a missing llama-cpp-python skips the caller, fails it in CI)."""
    return _loaded()
