"""GGUF files: metadata as python values, tensors as numpy arrays (read via the `gguf` package).

The reader memory-maps the file, so opening is cheap and tensor bytes are only read when
a tensor is dequantized. Every problem names the file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import CorruptModelFileError, ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFTensor:
    name: str
    qtype: str  # GGUF spelling: F32, Q4_1, Q4_K, ...
    shape: tuple[int, ...]  # numpy (row-major) shape: last axis is the contiguous one
    data: np.ndarray  # raw bytes (uint8) for block formats, or a typed array for F32/F16/...


class GGUFFile:
    """A GGUF model file: `metadata` (dict of python values) and its tensors."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ModelNotFoundError(f"model file not found: {self.path}")
        if os.path.isdir(self.path):
            raise ModelLoadError(f"{self.path} is a directory, expected a .gguf file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CorruptModelFileError(
                f"{self.path} is not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r})"
            )
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as exc:  # the gguf package raises ValueError/IndexError/struct errors
            raise CorruptModelFileError(
                f"{self.path}: cannot parse the GGUF file ({type(exc).__name__}: {exc}); "
                "the file is probably truncated or corrupt — download it again"
            ) from exc
        self._check_tensor_extents()
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception as exc:
                raise CorruptModelFileError(f"{self.path}: metadata key {key!r} is unreadable: {exc}") from exc
        self._tensors = {t.name: t for t in self._reader.tensors}

    def _check_tensor_extents(self) -> None:
        size = os.path.getsize(self.path)
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise CorruptModelFileError(
                    f"{self.path}: tensor {t.name!r} ends at byte {end} but the file has only {size} bytes "
                    "(truncated download?)"
                )

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> GGUFTensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing from the file") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return GGUFTensor(name=name, qtype=t.tensor_type.name, shape=shape, data=t.data)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in its numpy shape."""
        t = self.tensor(name)
        from ..quant import dequantize

        try:
            return dequantize(np.asarray(t.data), t.qtype, t.shape)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has type {t.qtype}, not supported: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)
