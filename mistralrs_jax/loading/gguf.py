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
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 24
# An array may hold arrays (one level); llama.cpp refuses even that, real files never nest.
MAX_ARRAY_DEPTH = 2
MAX_NESTED_ARRAYS = 1 << 16  # arrays inside arrays, over the whole file
# GGUF metadata value types: scalar struct codes, string, array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Fewest bytes one key/value pair and one tensor record take (bounds the counts by the file size).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8


@dataclass
class GGUFTensor:
    name: str
    qtype: str  # GGUF spelling: F32, Q4_1, Q4_K, ...
    shape: tuple[int, ...]  # numpy (row-major) shape: last axis is the contiguous one
    data: np.ndarray  # raw bytes (uint8), a view of the memory map


class _Corrupt(ValueError):
    """A structural problem found while parsing; `_parse_file` names the file."""


def _read_version(data, source: str) -> tuple[str, int]:
    """(struct byte order, version); refuses versions this reader does not know."""
    version = struct.unpack_from("<I", data, 4)[0]
    order = "<"
    if version & 0xFFFF == 0 and version:  # a big-endian file reads as a huge little-endian number
        order, version = ">", struct.unpack_from(">I", data, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        if version < SUPPORTED_VERSIONS[0]:
            raise CorruptModelFileError(f"{source}: GGUF version {version} is too old (need 2 or later)")
        raise CorruptModelFileError(
            f"{source}: GGUF version {version} is not one this reader knows ({', '.join(map(str, SUPPORTED_VERSIONS))}); "
            "the file is corrupt or from a newer llama.cpp — convert it with a gguf-py that writes version 3")
    return order, version


def _parse(data, source: str) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, [(name, numpy shape, ggml type id, offset)], start of tensor data).

    Every count is checked against the bytes left before anything is allocated for it."""
    if data[:4] != GGUF_MAGIC:
        raise CorruptModelFileError(f"{source} is not a GGUF file (first bytes {bytes(data[:4])!r}, expected {GGUF_MAGIC!r})")
    order, _ = _read_version(data, source)
    size = len(data)
    tensor_count, kv_count = struct.unpack_from(order + "QQ", data, 8)
    if kv_count * _MIN_KV_BYTES > size or tensor_count * _MIN_TENSOR_BYTES > size:
        raise _Corrupt(f"the header claims {kv_count} metadata keys and {tensor_count} tensors, more than "
                       f"{size} bytes can hold")
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")
    nested = 0

    def read_string(at: int) -> tuple[str, int]:
        length = u64.unpack_from(data, at)[0]
        at += 8
        if length > size - at:
            raise _Corrupt(f"a string at byte {at - 8} claims {length} bytes, past the end of the file")
        return data[at:at + length].decode("utf-8", errors="replace"), at + length

    def read_value(kind: int, at: int, depth: int) -> tuple[Any, int]:
        nonlocal nested
        if kind == _STRING:
            return read_string(at)
        if kind in _SCALARS:
            code = order + _SCALARS[kind]
            return struct.unpack_from(code, data, at)[0], at + struct.calcsize(code)
        if kind != _ARRAY:
            raise _Corrupt(f"unknown GGUF value type {kind} at byte {at - 4}")
        if depth >= MAX_ARRAY_DEPTH:
            raise _Corrupt(f"arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {at}")
        item_kind = u32.unpack_from(data, at)[0]
        count = u64.unpack_from(data, at + 4)[0]
        at += 12
        if item_kind in _SCALARS:
            dtype = np.dtype(order + _SCALARS[item_kind])
            if count > (size - at) // dtype.itemsize:
                raise _Corrupt(f"an array at byte {at - 12} claims {count} items, past the end of the file")
            values = np.frombuffer(data, dtype=dtype, count=count, offset=at)
            return values.tolist(), at + count * dtype.itemsize
        least = {_STRING: 8, _ARRAY: 12}.get(item_kind)
        if least is None:
            raise _Corrupt(f"unknown GGUF array item type {item_kind} at byte {at - 12}")
        if count > (size - at) // least:
            raise _Corrupt(f"an array at byte {at - 12} claims {count} items, past the end of the file")
        if item_kind == _ARRAY:
            nested += count
            if nested > MAX_NESTED_ARRAYS:
                raise _Corrupt(f"more than {MAX_NESTED_ARRAYS} arrays nested in arrays")
        items = []
        for _ in range(count):
            item, at = read_value(item_kind, at, depth + 1)
            items.append(item)
        return items, at

    metadata: dict[str, Any] = {}
    offset = 24
    for _ in range(kv_count):
        key, offset = read_string(offset)
        if key in metadata:
            raise _Corrupt(f"metadata key {key!r} appears twice")
        kind = u32.unpack_from(data, offset)[0]
        metadata[key], offset = read_value(kind, offset + 4, 0)
    tensors = []
    seen: set[str] = set()
    for _ in range(tensor_count):
        name, offset = read_string(offset)
        if name in seen:
            raise _Corrupt(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = u32.unpack_from(data, offset)[0]
        if n_dims > MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} claims {n_dims} dimensions (at most {MAX_DIMS})")
        dims = struct.unpack_from(order + "q" * n_dims, data, offset + 4)
        if any(d < 0 for d in dims) or np.prod(dims, dtype=object) > size * 8:
            raise _Corrupt(f"tensor {name!r} has dimensions {list(dims)}, more than the file can hold")
        offset += 4 + 8 * n_dims
        type_id, tensor_offset = struct.unpack_from(order + "IQ", data, offset)
        offset += 12
        tensors.append((name, tuple(int(d) for d in reversed(dims)), type_id, tensor_offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise _Corrupt(f"general.alignment {alignment!r} is not a power of two up to {MAX_ALIGNMENT}")
    data_start = -(-offset // alignment) * alignment
    return metadata, tensors, data_start


def _check_tensor_layout(source: str, spans: list[tuple[str, int, int]], data_start: int, size: int,
                         alignment: int) -> None:
    """Each tensor's bytes start aligned, lie inside the file and overlap no other tensor.
    `spans`: (name, offset from the data start, byte length)."""
    end_of_previous, previous = 0, None
    for name, offset, length in sorted(spans, key=lambda span: span[1]):
        if offset % alignment:
            raise CorruptModelFileError(
                f"{source}: tensor {name!r} starts at data offset {offset}, not a multiple of the alignment "
                f"{alignment}; the file is corrupt")
        expected = -(-end_of_previous // alignment) * alignment
        if offset != expected:
            how = "overlaps" if offset < end_of_previous else "leaves a gap after"
            raise CorruptModelFileError(
                f"{source}: tensor {name!r} (data offset {offset}) {how} tensor {previous!r}, which ends at "
                f"{end_of_previous} (expected the next tensor at {expected}); the file is corrupt, or a tensor's "
                "type or shape was changed")
        if data_start + offset + length > size:
            raise CorruptModelFileError(
                f"{source}: tensor {name!r} ends at byte {data_start + offset + length} but the file has only "
                f"{size} bytes (truncated download?)")
        end_of_previous, previous = offset + length, name


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
    except (struct.error, IndexError, ValueError, OverflowError, UnicodeDecodeError, MemoryError,
            RecursionError) as exc:
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
        try:
            self._read(nbytes, qtype_name)
        except BaseException:
            self.close()  # a refused file leaves no mapping behind
            raise

    def close(self) -> None:
        """Unmap the file (only once no tensor view is left)."""
        self._tensors = {}
        try:
            self._map.close()
        except BufferError:  # numpy views still hold it: it closes when they are gone
            pass

    def _read(self, nbytes, qtype_name) -> None:
        self.metadata, infos, data_start = _parse_file(self.path, self._map)
        size = len(self._map)
        self._tensors: dict[str, GGUFTensor] = {}
        spans, qtypes = [], []
        for name, shape, type_id, offset in infos:
            try:
                qtype = qtype_name(type_id)
            except NotSupportedError as exc:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has an unsupported type ({exc})") from exc
            try:
                length = nbytes(qtype, shape)
            except NotSupportedError as exc:
                raise CorruptModelFileError(f"{self.path}: tensor {name!r} cannot be {qtype}: {exc}") from exc
            spans.append((name, offset, length))
            qtypes.append(qtype)
        _check_tensor_layout(self.path, spans, data_start, size,
                             int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)))
        for (name, shape, _, offset), (_, _, length), qtype in zip(infos, spans, qtypes):
            raw = np.frombuffer(self._map, dtype=np.uint8, count=length, offset=data_start + offset)
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


def check_tensor_shapes(gguf: GGUFFile, config) -> None:
    """The tensors a model is built from against the hyperparameters (a `ModelConfig`): the block
    count against the `blk.N.` tensors, and the embedding, norm, attention and MLP shapes, as
    llama.cpp checks each tensor it creates. A mismatch is a corrupt file, named here, rather than
    garbage logits or a raw JAX shape error at the first request."""
    blocks = {int(name.split(".")[1]) for name in gguf.tensor_names
              if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if blocks and blocks != set(range(config.num_layers)):
        missing = sorted(set(range(config.num_layers)) - blocks)[:5]
        raise CorruptModelFileError(
            f"{gguf.path}: the metadata says {config.num_layers} blocks, but the file holds tensors of blocks "
            f"{min(blocks)}..{max(blocks)} ({len(blocks)} blocks{', missing ' + str(missing) if missing else ''}); "
            "the file is corrupt")
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens and len(tokens) != config.vocab_size:
        raise CorruptModelFileError(
            f"{gguf.path}: the vocabulary lists {len(tokens)} tokens but the model has {config.vocab_size}; "
            "the file is corrupt")
    hidden, head_dim, ffn = config.hidden_size, config.head_dim, config.intermediate_size
    expected: dict[str, tuple[tuple[int, ...], ...]] = {
        "token_embd.weight": ((config.vocab_size, hidden),),
        "output.weight": ((config.vocab_size, hidden),),
        "output_norm.weight": ((hidden,),),
    }
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    for i in range(config.num_layers):
        block = f"blk.{i}."
        expected.update({
            block + "attn_norm.weight": ((hidden,),),
            block + "ffn_norm.weight": ((hidden,),),
            block + "attn_q.weight": ((q_rows, hidden),),
            block + "attn_k.weight": ((kv_rows, hidden),),
            block + "attn_v.weight": ((kv_rows, hidden),),
            block + "attn_qkv.weight": ((q_rows + 2 * kv_rows, hidden),),
            block + "attn_output.weight": ((hidden, q_rows),),
            block + "attn_q_norm.weight": ((head_dim,),),
            block + "attn_k_norm.weight": ((head_dim,),),
            block + "ffn_gate.weight": ((ffn, hidden),),
            block + "ffn_up.weight": ((ffn, hidden), (2 * ffn, hidden)),  # Phi-3 fuses gate and up
            block + "ffn_down.weight": ((hidden, ffn),),
        })
    for name, shapes in expected.items():
        if name in gguf and gguf.tensor(name).shape not in shapes:
            raise CorruptModelFileError(
                f"{gguf.path}: tensor {name!r} has shape {list(gguf.tensor(name).shape)}, but the hyperparameters "
                f"call for {' or '.join(str(list(s)) for s in shapes)}; the file is corrupt")
    if "token_embd.weight" not in gguf:
        raise CorruptModelFileError(f"{gguf.path}: the file has no token embedding (token_embd.weight)")
