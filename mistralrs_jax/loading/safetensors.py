"""Hugging Face checkpoints: `config.json` plus one or several `*.safetensors` shards.

Tensors are read one at a time, when a builder asks for one, converted to the weight dtype and
laid out for `Linear` right away, so loading never holds a second full copy of the model: the
peak is the model plus the tensor in flight. Each shard is memory-mapped and a tensor is a
numpy view of its bytes (file-backed pages the OS can drop), copied once into a device array.
The header is read here rather than with `safetensors.safe_open` because that copies every
tensor twice on the way to JAX, and its numpy path has no bfloat16.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..errors import CorruptModelFileError, ModelLoadError, ModelNotFoundError
from ..models.layers import Embedding, Linear
from ..json_files import read_json_object
from ..models.model_config import config_from_hf, with_generation_eos
from ..models.registry import build_model, resolve_dtype
from ..models.weights import WeightSource

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF per-expert names of Mixtral's MoE weights: w1 = gate, w3 = up, w2 = down.
HF_EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


# safetensors dtype names -> numpy dtypes (the bfloat16/float8 ones come from ml_dtypes, a JAX dependency).
def _numpy_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
            "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# The safetensors format's own bound on the JSON header (100 MB).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """One .safetensors file: an 8-byte little-endian header length, a JSON header naming each
    tensor's dtype, shape and byte range, then the bytes. Tensors are views of a memory map.

    The header is checked whole when the file opens, as the safetensors library checks it: an
    object of {dtype, shape, data_offsets} entries whose byte ranges match dtype x shape, lie in
    the file, and cover the data without overlap or gap. A corrupt file is refused here, named."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < 8:
                    raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"header length {header_len} exceeds the file or the format's limit")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, struct.error, RecursionError) as exc:
            raise CorruptModelFileError(
                f"{path} is not a readable safetensors file ({exc}); download it again") from exc
        self._data_start = 8 + header_len
        self.entries: dict[str, dict] = self._checked_entries(header, size - self._data_start)
        self._map: np.memmap | None = None

    def _corrupt(self, why: str) -> CorruptModelFileError:
        return CorruptModelFileError(f"{self.path}: {why}; the safetensors file is corrupt, download it again")

    def _checked_entries(self, header: Any, data_size: int) -> dict[str, dict]:
        if not isinstance(header, dict):
            raise self._corrupt(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise self._corrupt("__metadata__ is not an object")
        dtypes = _numpy_dtypes()
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise self._corrupt(f"the entry of tensor {name!r} is not an object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if not isinstance(dtype, str):
                raise self._corrupt(f"tensor {name!r} has no dtype name")
            if dtype not in dtypes:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has dtype {dtype}, which is not supported")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise self._corrupt(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] <= data_size):
                raise self._corrupt(f"tensor {name!r} has data_offsets {offsets!r}, not a byte range inside the "
                                    f"{data_size} data bytes")
            expected = math.prod(shape) * np.dtype(dtypes[dtype]).itemsize
            if offsets[1] - offsets[0] != expected:
                raise self._corrupt(f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes, its byte "
                                    f"range holds {offsets[1] - offsets[0]}")
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                raise self._corrupt(f"tensor {name!r} starts at data byte {begin}, expected {end} "
                                    f"({'an overlap' if begin < end else 'a gap'})")
            end = stop
        if end != data_size:
            raise self._corrupt(f"the tensors cover {end} data bytes but the file holds {data_size} (a wrong header "
                                "length, or a truncated or padded file)")
        return header

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = _numpy_dtypes()[entry["dtype"]]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(dtype).reshape(tuple(entry["shape"]))

    def close(self) -> None:
        self._map = None


def load_hf_config(model_dir: str) -> ModelConfig:
    """`config.json` of a checkpoint directory as a ModelConfig; `generation_config.json`, when
    present, adds its end-of-sequence ids."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{model_dir} has no {CONFIG_FILE}; a Hugging Face model directory needs one")
    return with_generation_eos(config_from_hf(read_json_object(path), source=path), model_dir)


# generation_config.json keys -> SamplingParams fields.
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str) -> dict[str, Any]:
    """The default sampling a checkpoint's `generation_config.json` asks for, as SamplingParams
    keyword arguments (`do_sample: false` means greedy); {} when there is no such file."""
    generation = read_json_object(os.path.join(model_dir, GENERATION_CONFIG_FILE), missing_ok=True)
    defaults = {field: generation[key] for key, field in GENERATION_DEFAULT_KEYS.items()
                if isinstance(generation.get(key), (int, float)) and not isinstance(generation.get(key), bool)}
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


class SafetensorsWeights(WeightSource):
    """The tensors of an HF checkpoint directory by name; a context manager that closes the shards."""

    def __init__(self, model_dir: str, dtype=jnp.float32):
        self.path = os.fspath(model_dir)
        self.dtype = dtype
        self._shard_of = self._index_shards()
        self._handles: dict[str, Any] = {}
        # Multimodal checkpoints nest the text decoder ("language_model.model.", "model.language_model.").
        embed = next((n for n in self._shard_of if n.endswith("embed_tokens.weight")), "model.embed_tokens.weight")
        self._model_prefix = embed[: -len("embed_tokens.weight")]

    def _index_shards(self) -> dict[str, str]:
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptModelFileError(f"{index_path} has no \"weight_map\"; download it again")
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.path, shard)):
                    raise ModelNotFoundError(
                        f"{index_path} names the shard {shard!r}, which is not in {self.path}: the download is "
                        "incomplete; fetch the missing file again")
            return {name: os.path.join(self.path, shard) for name, shard in weight_map.items()}
        single = os.path.join(self.path, SINGLE_FILE)
        files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            raise ModelNotFoundError(f"{self.path} holds no *.safetensors weights")
        shard_of = {}
        for path in files:
            shard_of.update({name: path for name in SafetensorsFile(path).keys()})
        return shard_of

    def __enter__(self) -> "SafetensorsWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    # -- names -----------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name the checkpoint stores, as stored (nested prefixes included)."""
        return list(self._shard_of)

    def _stored_name(self, name: str) -> str | None:
        if name in self._shard_of:
            return name
        if name.startswith("model.") and self._model_prefix != "model.":
            nested = self._model_prefix + name[len("model."):]
            if nested in self._shard_of:
                return nested
        if name.startswith("lm_head.") and "language_model." + name in self._shard_of:
            return "language_model." + name
        return None

    def has(self, name: str) -> bool:
        return self._stored_name(name) is not None

    def _tensor(self, name: str) -> np.ndarray:
        """One tensor as a numpy view of the mapped file, in its stored dtype."""
        stored = self._stored_name(name)
        if stored is None:
            raise CorruptModelFileError(
                f"{self.path}: the checkpoint has no tensor {name!r}, which its config.json calls for; the weights "
                "do not match the config (or a shard is missing)")
        path = self._shard_of[stored]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = SafetensorsFile(path)
        if stored not in handle.entries:
            raise CorruptModelFileError(f"{path} has no tensor {stored!r} although the index says so; "
                                        "download the checkpoint again")
        return handle.tensor(stored)

    # -- WeightSource ------------------------------------------------------------------------

    def array(self, name: str) -> np.ndarray:
        return np.asarray(self._tensor(name), dtype=np.float32)

    # `make_linear(source, tensor_name, row_transform, bias=None) -> Linear`, the same hook
    # GGUF models build projections through; ISQ wraps it (quant/isq.py). None: dense.
    make_linear = None

    def tensor(self, name: str) -> np.ndarray:
        """A tensor in its stored dtype and shape (what ISQ reads the shape from)."""
        return self._tensor(name)

    def dequantize(self, name: str) -> np.ndarray:
        """A tensor as f32 (the ISQ source; safetensors hold no block formats)."""
        return self.array(name)

    def dense_linear(self, source, name: str, row_transform=None, bias: np.ndarray | None = None) -> Linear:
        from ..quant.packed import PackedWeight

        if isinstance(source, PackedWeight):  # what ISQ built from this tensor
            return Linear(packed=source.map_rows(row_transform), bias=bias)
        weight = self._tensor(name)
        if row_transform is not None:
            weight = row_transform(np.asarray(weight, np.float32))
        # One copy into a device array in the stored layout, then [out, in] -> [in, out] there.
        return Linear(jnp.asarray(weight, dtype=self.dtype).T, bias=bias, dtype=self.dtype)

    def linear(self, module: str) -> Linear:
        weight = self._tensor(module + ".weight")
        if weight.ndim != 2:
            raise CorruptModelFileError(f"{self.path}: {module}.weight has shape {tuple(weight.shape)}, expected 2-D")
        bias = self.array(module + ".bias") if self.has(module + ".bias") else None
        make_linear = self.make_linear or self.dense_linear
        return make_linear(self, module + ".weight", None, bias=bias)

    def embedding(self, module: str) -> Embedding:
        return Embedding(jnp.asarray(self._tensor(module + ".weight"), dtype=self.dtype), dtype=self.dtype)

    def experts(self, layer: int, which: str) -> np.ndarray:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts."
        stacked = []
        while self.has(f"{prefix}{len(stacked)}.{HF_EXPERT_NAMES[which]}.weight"):
            stacked.append(self.array(f"{prefix}{len(stacked)}.{HF_EXPERT_NAMES[which]}.weight"))
        if not stacked:
            raise ModelLoadError(f"{self.path}: no MoE expert weights {prefix}N.{HF_EXPERT_NAMES[which]}.weight "
                                 f"for layer {layer} (only Mixtral's per-expert layout is supported)")
        return np.stack(stacked)


def build_model_from_hf(model_dir: str, config: ModelConfig, dtype: str = "auto",
                        wrap_linear: Callable[[Callable], Callable] | None = None):
    """A Hugging Face checkpoint directory (config already parsed) -> model; `wrap_linear`
    as in `gguf_weights.build_model_from_gguf`."""
    weight_dtype = resolve_dtype(dtype, config.dtype)
    with SafetensorsWeights(model_dir, weight_dtype) as source:
        if wrap_linear is not None:
            source.make_linear = wrap_linear(source.dense_linear)
        return build_model(config, source, weight_dtype)
