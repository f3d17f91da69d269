"""In-situ quantization (ISQ): quantize a model's projections while it loads, and again at runtime.

mistral.rs' ISQ types (`--isq Q4K`, or a bit count such as `--isq 4`) are GGUF block
formats or HQQ. Each weight becomes a `PackedWeight` (packed.py) at the type's own bits per
weight: a GGUF type is quantized to exactly the bytes llama.cpp's reference quantizers write
(`formats.quantize`), HQQ to this project's HQQ4/HQQ8 block layout (hqq.py). The model's
layers build their `Linear` from it (the wrapped factory is called with the PackedWeight as
its source), so quant/ never imports the model code.

Memory. `ISQFactory` wraps a model builder's `make_linear`: for every projection it
dequantizes that one tensor to f32, quantizes it, builds the `Linear` and drops the f32
copy before the builder asks for the next one. Peak memory is the finished model plus
about two f32 copies of the largest projection (the dequantized tensor and its
row-permuted copy), never the f32 model plus the quantized one. The token embedding and
a separate lm_head are left to the wrapped factory, i.e. held at the source's precision:
they are the most precision-sensitive tensors and the embedding is only gathered from.

Rows that do not fill a type's blocks (K-quants pack 256 values, HQQ groups 64) fall back
the way llama.cpp's quantizer does (`FALLBACK_TYPES`: a 32-value type of at least the same
precision) or, when even 32 does not divide the row, keep the tensor at source precision.

Speed. The quantizers are vectorized numpy (K-quants run at ~5-10 M values/s per core),
which releases the GIL inside its array loops, so a tensor's rows are split into chunks
quantized on a thread pool (blocks never straddle rows: the bytes are the same as one
call's).
"""
from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ..errors import InvalidRequestError, NotSupportedError
from .packed import HQQ_BITS, PackedWeight, block_geometry, quantize_packed

log = logging.getLogger(__name__)

F32 = np.float32

# mistral.rs' ISQ type names -> the GGUF block type each one is (HQQ types map to bit counts).
GGUF_ISQ_TYPES: dict[str, str] = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q8_1": "Q8_1",
    "Q2K": "Q2_K", "Q3K": "Q3_K", "Q4K": "Q4_K", "Q5K": "Q5_K", "Q6K": "Q6_K", "Q8K": "Q8_K",
}
HQQ_ISQ_BITS: dict[str, int] = HQQ_BITS
ISQ_TYPES: tuple[str, ...] = (*GGUF_ISQ_TYPES, *HQQ_ISQ_BITS)

# `--isq 4`: mistral.rs picks Q*K types off Metal (AFQ on Metal), and Q8_0 for 8 bits.
BITS_TO_ISQ_TYPE = {2: "Q2K", 3: "Q3K", 4: "Q4K", 5: "Q5K", 6: "Q6K", 8: "Q8_0"}

# Recognised mistral.rs types this engine does not implement, and why.
_NOT_HERE = {
    **{f"AFQ{b}": "AFQ is mistral.rs' Metal-only affine format" for b in (2, 3, 4, 6, 8)},
    "FP8": "FP8 weights are not implemented in mistralrs-jax",
    "F8Q8": "F8Q8 is not implemented in mistralrs-jax",
    **{f"HQQ{b}": "mistral.rs itself only enables HQQ4 and HQQ8" for b in (1, 2, 3)},
}

# When a row is not a whole number of 256-value super-blocks, llama.cpp's quantizer falls
# back to a 32-value type of at least the same precision (tensor_type_fallback in
# llama-quant.cpp; tests/test_isq.py runs llama_model_quantize to check). HQQ's
# 64-value groups fall back to the 32-value affine type of the same bits.
FALLBACK_TYPES: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                                  "Q6_K": "Q8_0", "Q8_K": "Q8_0", "HQQ4": "Q4_1", "HQQ8": "Q8_0"}

# Tensors left at source precision: the lm_head (GGUF and HF names). Embeddings never go
# through make_linear at all.
SOURCE_PRECISION_TENSORS = frozenset({"output.weight", "lm_head.weight"})

# Work per thread-pool task: big enough that numpy's GIL-free loops dominate.
_MIN_CHUNK_VALUES = 1 << 17


def normalize_isq_type(name: str | int) -> str:
    """The canonical ISQ type name for a user's spelling.

    Accepts mistral.rs' names in any case (Q4K, q4_0, hqq8), GGUF spellings (Q4_K) and
    bit counts (2, 3, 4, 5, 6, 8, or "4"), which map like mistral.rs off Metal.
    """
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise InvalidRequestError(f"an ISQ type must be a name such as 'Q4K', got {name!r}", param="isq_type")
    text = str(name).strip().upper().replace("-", "_")
    if text.isdigit():
        bits = int(text)
        if bits not in BITS_TO_ISQ_TYPE:
            raise InvalidRequestError(f"--isq {bits}: a bit count must be one of "
                                      f"{', '.join(map(str, BITS_TO_ISQ_TYPE))}", param="isq_type")
        return BITS_TO_ISQ_TYPE[bits]
    if len(text) == 4 and text.startswith("Q") and text.endswith("_K"):  # GGUF spelling Q4_K
        text = text.replace("_K", "K")
    if text in ISQ_TYPES:
        return text
    if text in _NOT_HERE:
        raise NotSupportedError(f"ISQ type {name!r} is not available: {_NOT_HERE[text]}; choose one of "
                                f"{', '.join(ISQ_TYPES)}")
    raise InvalidRequestError(f"unknown ISQ type {name!r}; choose one of {', '.join(ISQ_TYPES)} "
                              f"(or a bit count: {', '.join(map(str, BITS_TO_ISQ_TYPE))})", param="isq_type")


def effective_type(isq_type: str, in_features: int) -> str | None:
    """The packed format a weight with `in_features` columns gets under `isq_type` (a GGUF name,
    or HQQ4/HQQ8), or None when it must stay at source precision."""
    isq_type = normalize_isq_type(isq_type)
    wanted = GGUF_ISQ_TYPES.get(isq_type, isq_type)
    for qtype in (wanted, FALLBACK_TYPES.get(wanted)):
        if qtype is not None and in_features % block_geometry(qtype)[0] == 0:
            return qtype
    return None


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def default_workers() -> int:
    """CPUs this process may run on (its affinity), which is what the pool is sized from."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool, grown when a caller asks for more workers (threads are cheap)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isq"), workers
        return _pool


def quantize_weight(w: np.ndarray, isq_type: str, *, workers: int | None = None,
                    name: str = "") -> PackedWeight | None:
    """Quantize one f32 weight [out, in] to the packed form of `isq_type`.

    Returns a PackedWeight (its `qtype` is the format used, a fallback when the rows fill no
    block of the wanted one), or None when no format of this ISQ type fits the row length:
    the caller keeps the weight at source precision. Falling back or keeping is logged with `name`.
    """
    isq_type = normalize_isq_type(isq_type)
    values = np.asarray(w, dtype=F32)
    if values.ndim != 2:
        raise ValueError(f"quantize_weight takes a 2-D weight [out, in], got shape {values.shape}")
    rows, cols = values.shape
    qtype = effective_type(isq_type, cols)
    label = name or f"a [{rows}, {cols}] weight"
    if qtype is None:
        log.info("ISQ %s: %s keeps source precision (%d input columns fill no %s block)", isq_type, label, cols,
                 isq_type)
        return None
    wanted = GGUF_ISQ_TYPES.get(isq_type, isq_type)
    if qtype != wanted:
        log.info("ISQ %s: %s is quantized as %s: %d input columns are not a multiple of %s's block",
                 isq_type, label, qtype, cols, wanted)
    block_elems, type_size = block_geometry(qtype)
    blocks = np.empty((rows, cols // block_elems * type_size), dtype=np.uint8)

    def run(start: int, stop: int) -> None:
        blocks[start:stop] = quantize_packed(values[start:stop], qtype).blocks

    workers = workers or default_workers()
    chunks = min(rows, workers * 2, max(1, values.size // _MIN_CHUNK_VALUES))
    step = math.ceil(rows / chunks)
    bounds = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    if len(bounds) == 1 or workers == 1:
        for start, stop in bounds:
            run(start, stop)
    else:
        for future in [_thread_pool(workers).submit(run, start, stop) for start, stop in bounds]:
            future.result()
    return PackedWeight(blocks, qtype, cols)


class ISQFactory:
    """A `make_linear(source, name, row_transform=None, bias=None)` that applies ISQ.

    `source` is what the model's `GGUFWeights` passes (a `GGUFFile`); any object with
    `tensor(name).shape` (numpy order, [out, in]) and `dequantize(name) -> f32 array` serves,
    e.g. an adapter over safetensors shards.

    Wraps a model builder's factory (`registry.make_linear_factory`): the lm_head and any
    tensor whose rows fit no block of the type go through the wrapped factory unchanged;
    every other projection is dequantized, row-transformed, quantized and built one at a
    time. With `isq_type=None` it only records, so a model loaded without ISQ can still be
    re-quantized later (`requantize`).

    It remembers, per tensor name, the `Linear` it returned (`linears`), the format it got
    (`types`: a GGUF name, HQQ4/HQQ8, or "source") and where the weight came from, which is
    what runtime re-ISQ and the ISQ cache need.

    `cache`: {tensor name: {"blocks": uint8 packed bytes}} from `load_isq_cache`; tensors found
    there (with the right shape) are not quantized again (the format follows from the ISQ
    type and the row length, both part of the cache key).

    A `Linear` is built by calling the wrapped factory with the `PackedWeight` as its source
    (`make_linear(packed, name, None, bias=bias)`): the factories hold such a source as is.
    """

    def __init__(self, make_linear: Callable, isq_type: str | None, progress: Callable | None = None, *,
                 workers: int | None = None, cache: dict[str, dict[str, np.ndarray]] | None = None):
        self.make_linear = make_linear
        self.isq_type = normalize_isq_type(isq_type) if isq_type is not None else None
        self.progress = progress
        self.workers = workers or default_workers()
        self.cache = cache or {}
        self.linears: dict[str, Any] = {}
        self.types: dict[str, str] = {}
        self.cache_hits = 0
        self._sources: dict[str, tuple[Any, Callable | None]] = {}
        self._bar = None

    # -- building ------------------------------------------------------------------------

    def __call__(self, gguf, name: str, row_transform: Callable | None = None, bias: np.ndarray | None = None):
        self._sources[name] = (gguf, row_transform)
        linear, kind = self._build(gguf, name, row_transform, bias, self.isq_type)
        self.linears[name] = linear
        self.types[name] = kind
        self._tick(gguf, name, kind)
        return linear

    def _build(self, gguf, name: str, row_transform, bias, isq_type: str | None):
        if isq_type is None or name in SOURCE_PRECISION_TENSORS:
            return self.make_linear(gguf, name, row_transform, bias=bias), "source"
        shape = tuple(gguf.tensor(name).shape)
        qtype = effective_type(isq_type, shape[1]) if len(shape) == 2 else None
        if qtype is None:
            log.info("ISQ %s: %s %s keeps source precision (its rows fill no %s block)", isq_type, name, shape,
                     isq_type)
            return self.make_linear(gguf, name, row_transform, bias=bias), "source"
        cached = self.cache.get(name)
        if cached is not None:
            try:
                packed = PackedWeight(np.asarray(cached["blocks"]), qtype, shape[1])
            except (KeyError, NotSupportedError):
                packed = None  # another layout: quantize again
            if packed is not None and packed.out_features == shape[0]:
                self.cache_hits += 1
                return self.make_linear(packed, name, None, bias=bias), qtype
        weight = self.source_weight(name)
        packed = quantize_weight(weight, isq_type, workers=self.workers, name=name)
        del weight  # the f32 copy goes before the builder asks for the next tensor
        return self.make_linear(packed, name, None, bias=bias), packed.qtype

    def source_weight(self, name: str) -> np.ndarray:
        """Tensor `name` as f32 [out, in] from its source file, row-transformed as the model wants."""
        gguf, row_transform = self._sources[name]
        weight = gguf.dequantize(name)
        return row_transform(weight) if row_transform is not None else weight

    def _tick(self, gguf, name: str, kind: str) -> None:
        if self.progress is not None:
            self.progress(name, kind)
            return
        if self.isq_type is None:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            names = getattr(gguf, "tensor_names", [])  # every 2-D tensor of a GGUF block is a projection
            total = sum(1 for n in names if n.startswith("blk.") and len(gguf.tensor(n).shape) == 2)
            self._bar = tqdm(total=total or None, desc=f"ISQ {self.isq_type}", unit="tensor", disable=None,
                             leave=False)
        self._bar.update(1)
        self._bar.set_postfix_str(f"{name} -> {kind}", refresh=False)
        if self._bar.total is not None and self._bar.n >= self._bar.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- after building ----------------------------------------------------------------

    def summary(self) -> dict[str, int]:
        """How many projections got each format."""
        counts: dict[str, int] = {}
        for kind in self.types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def quantized_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """The ISQ'd projections' packed bytes by tensor name, for `save_isq_cache`."""
        return {name: {"blocks": np.asarray(linear.blocks[...])} for name, linear in self.linears.items()
                if self.types[name] != "source" and linear.quantized}

    def requantize(self, isq_type: str | None, progress: Callable | None = None) -> dict[str, int]:
        """Re-quantize every projection this factory built, in place, from its source file.

        `isq_type=None` goes back to the wrapped factory's form. Each `Linear` object keeps
        its identity (the model tree is untouched); its arrays are replaced one tensor at a
        time, so while nothing else holds the old arrays (drop the runner's flattened
        weights first) memory peaks at the model plus about one tensor. Returns `summary()`.
        After it, re-split the model (`nnx.split`) and re-jit: array shapes and the static
        format names change.
        """
        isq_type = normalize_isq_type(isq_type) if isq_type is not None else None
        self.cache = {}  # a cache belongs to the type it was made for
        for name, linear in list(self.linears.items()):
            gguf, row_transform = self._sources[name]
            bias = np.asarray(linear.bias[...]) if linear.bias is not None else None
            new, kind = self._build(gguf, name, row_transform, bias, isq_type)
            _adopt(linear, new)
            self.types[name] = kind
            if progress is not None:
                progress(name, kind)
        self.isq_type = isq_type
        return self.summary()


def _adopt(target, source) -> None:
    """Make the nnx module `target` hold what `source` (same class, freshly built) holds.

    The module's whole attribute dict is taken over, nnx's own bookkeeping of which
    attributes are data included, so the layer's code need not know about re-ISQ.
    """
    if type(target) is not type(source):
        raise TypeError(f"cannot re-quantize a {type(target).__name__} into a {type(source).__name__}")
    state = vars(target)
    state.clear()
    state.update(vars(source))


def wrap_factory(make_linear: Callable, isq_type: str | None, progress: Callable | None = None, *,
                 workers: int | None = None, cache: dict | None = None) -> ISQFactory:
    """`make_linear` with ISQ applied (see `ISQFactory`); `progress(name, format)` replaces the
    default tqdm bar."""
    return ISQFactory(make_linear, isq_type, progress, workers=workers, cache=cache)
