"""GGUF files: metadata as python values, tensors as numpy views of a memory map.

A small reader of our own rather than `gguf.GGUFReader`: that one builds a numpy view per
element of every metadata array, which takes seconds to minutes on 50k-260k token
vocabularies (this reader: ~0.2 s). The `gguf` package still supplies the type ids and
the reference dequantizers the tests compare against. Every problem names the file.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import CorruptModelFileError, ModelLoadError, ModelNotFoundError, NotSupportedError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: scalar struct codes, string, array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    qtype: str  # GGUF spelling: F32, Q4_1, Q4_K, ...
    shape: tuple[int, ...]  # numpy (row-major) shape: last axis is the contiguous one
    data: np.ndarray  # raw bytes (uint8), a view of the memory map


def _parse(data, source: str) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, [(name, numpy shape, ggml type id, offset)], start of tensor data)."""
    if data[:4] != GGUF_MAGIC:
        raise CorruptModelFileError(f"{source} is not a GGUF file (first bytes {bytes(data[:4])!r}, expected {GGUF_MAGIC!r})")
    order = "<"
    version = struct.unpack_from("<I", data, 4)[0]
    if version & 0xFFFF == 0:  # a big-endian file reads as a huge little-endian number
        order, version = ">", struct.unpack_from(">I", data, 4)[0]
    if version < 2:
        raise CorruptModelFileError(f"{source}: GGUF version {version} is too old (need 2 or later)")
    tensor_count, kv_count = struct.unpack_from(order + "QQ", data, 8)
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")
    offset = 24

    def read_string(at: int) -> tuple[str, int]:
        length = u64.unpack_from(data, at)[0]
        at += 8
        if at + length > len(data):
            raise ValueError("a string runs past the end of the file")
        return data[at:at + length].decode("utf-8", errors="replace"), at + length

    def read_value(kind: int, at: int) -> tuple[Any, int]:
        if kind == _STRING:
            return read_string(at)
        if kind in _SCALARS:
            code = order + _SCALARS[kind]
            return struct.unpack_from(code, data, at)[0], at + struct.calcsize(code)
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item_kind = u32.unpack_from(data, at)[0]
        count = u64.unpack_from(data, at + 4)[0]
        at += 12
        if item_kind in _SCALARS:
            dtype = np.dtype(order + _SCALARS[item_kind])
            values = np.frombuffer(data, dtype=dtype, count=count, offset=at)
            return values.tolist(), at + count * dtype.itemsize
        items = []
        for _ in range(count):
            item, at = read_value(item_kind, at)
            items.append(item)
        return items, at

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key, offset = read_string(offset)
        kind = u32.unpack_from(data, offset)[0]
        metadata[key], offset = read_value(kind, offset + 4)
    tensors = []
    for _ in range(tensor_count):
        name, offset = read_string(offset)
        n_dims = u32.unpack_from(data, offset)[0]
        dims = struct.unpack_from(order + "Q" * n_dims, data, offset + 4)
        offset += 4 + 8 * n_dims
        type_id, tensor_offset = struct.unpack_from(order + "IQ", data, offset)
        offset += 12
        tensors.append((name, tuple(int(d) for d in reversed(dims)), type_id, tensor_offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-offset // alignment) * alignment
    return metadata, tensors, data_start


def open_map(path: str):
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory, expected a .gguf file")
    with open(path, "rb") as handle:
        try:
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise CorruptModelFileError(f"{path} is empty, not a GGUF file") from exc


def _parse_file(path: str, data):
    try:
        return _parse(data, path)
    except (struct.error, IndexError, ValueError, OverflowError, UnicodeDecodeError) as exc:
        raise CorruptModelFileError(
            f"{path}: cannot parse the GGUF header ({exc}); the file is probably truncated or corrupt — "
            "download or convert it again"
        ) from exc


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Every metadata key of a GGUF file as plain Python values (lists for arrays)."""
    data = open_map(os.fspath(path))
    try:
        return _parse_file(os.fspath(path), data)[0]
    finally:
        data.close()


class GGUFFile:
    """A GGUF model file: `metadata` (dict of python values) and its tensors (memory-mapped)."""

    def __init__(self, path: str):
        from ..quant import nbytes, qtype_name

        self.path = os.fspath(path)
        self._map = open_map(self.path)
        self.metadata, infos, data_start = _parse_file(self.path, self._map)
        size = len(self._map)
        self._tensors: dict[str, GGUFTensor] = {}
        for name, shape, type_id, offset in infos:
            try:
                qtype = qtype_name(type_id)
                length = nbytes(qtype, shape)
            except NotSupportedError as exc:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has an unsupported type ({exc})") from exc
            start = data_start + offset
            if start + length > size:
                raise CorruptModelFileError(
                    f"{self.path}: tensor {name!r} ends at byte {start + length} but the file has only {size} "
                    "bytes (truncated download?)"
                )
            raw = np.frombuffer(self._map, dtype=np.uint8, count=length, offset=start)
            self._tensors[name] = GGUFTensor(name=name, qtype=qtype, shape=shape, data=raw)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing from the file") from None

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in its numpy shape."""
        from ..quant import dequantize

        t = self.tensor(name)
        try:
            return dequantize(t.data, t.qtype, t.shape)
        except NotSupportedError as exc:
            raise ModelLoadError(f"{self.path}: tensor {name!r} ({t.qtype}) cannot be dequantized: {exc}") from exc
