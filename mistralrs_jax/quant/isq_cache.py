"""A disk cache of ISQ results (orbax-checkpoint), so a restart skips quantization.

`--isq-cache DIR`: after the first ISQ load the quantized arrays are written under DIR,
one entry per (source file, ISQ type); the next start with the same key restores them.

An entry is a directory named after a digest of its key:
    <DIR>/<digest>/arrays/      orbax PyTree checkpoint of the leaves, as a flat dict
    <DIR>/<digest>/entry.json   the key, each leaf's tree path, shape, dtype and CRC-32
entry.json is written last and the directory is renamed into place whole, so a save that
died half-way is never mistaken for an entry. The key names the source by path, size,
modification time and a hash of its first MiB (a GGUF header and tensor table; for a
Hugging Face directory, every file's name, size and mtime), plus the ISQ type and
`ISQ_CACHE_FORMAT`, which changes whenever the quantizers' output would.

The cache is an optimisation: a missing, stale (another key) or damaged entry is reported
with a warning and ignored, and a failed save only logs; neither ever stops a load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Bump when quantized output changes (quantizer fixes, new int8 layouts).
ISQ_CACHE_FORMAT = 2  # 2: packed block bytes (was int8 + scales)
_HEADER_BYTES = 1 << 20
_ENTRY_FILE = "entry.json"
_ARRAYS_DIR = "arrays"


def _file_identity(path: str) -> dict[str, Any]:
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_HEADER_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header_sha256": digest.hexdigest()}


def isq_cache_key(source_path: str, isq_type: str, **extra: Any) -> dict[str, Any]:
    """The cache key of ISQ type `isq_type` applied to a model file or HF checkpoint directory.

    `extra` (JSON values) adds whatever else changes the quantized arrays (e.g. dtype).
    """
    from .isq import normalize_isq_type

    path = os.path.abspath(os.fspath(source_path))
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
        source: dict[str, Any] = {"files": [[f, os.stat(os.path.join(path, f)).st_size,
                                             os.stat(os.path.join(path, f)).st_mtime_ns] for f in files]}
    else:
        source = _file_identity(path)
    return {"format": ISQ_CACHE_FORMAT, "source": path, **source, "isq_type": normalize_isq_type(isq_type),
            **extra}


def _canonical(key: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(key, sort_keys=True))


def _entry_dir(cache_dir: str, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(_canonical(key), sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(os.fspath(cache_dir), digest)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """Nested dicts of arrays -> [(path, array)] in sorted key order; None leaves are dropped."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        leaves = []
        for name in sorted(tree, key=str):
            if not isinstance(name, str):
                raise TypeError(f"ISQ cache trees take string keys only, got {name!r}")
            leaves.extend(_flatten(tree[name], prefix + (name,)))
        return leaves
    return [(prefix, np.asarray(tree))]


def _unflatten(leaves: list[tuple[list[str], np.ndarray]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, array in leaves:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array
    return tree


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _read_entry(entry: str) -> dict[str, Any]:
    with open(os.path.join(entry, _ENTRY_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def save_isq_cache(cache_dir: str, key: dict[str, Any], arrays: Any) -> str | None:
    """Write `arrays` (nested dicts of string keys -> arrays) under `cache_dir` for `key`.

    Returns the entry's directory, or None when the save failed (logged as a warning).
    Entries of the same source and ISQ type with another key (an older file) are removed.
    """
    import orbax.checkpoint as ocp

    key = _canonical(key)
    entry = _entry_dir(cache_dir, key)
    staging = f"{entry}.partial-{uuid.uuid4().hex[:8]}"
    try:
        leaves = _flatten(arrays)
        flat = {f"leaf{i:06d}": array for i, (_, array) in enumerate(leaves)}
        os.makedirs(staging)
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(staging, _ARRAYS_DIR), flat)
        record = {"key": key, "leaves": [{"path": list(path), "shape": list(array.shape), "dtype": array.dtype.str,
                                          "crc32": _crc(array)} for path, array in leaves]}
        with open(os.path.join(staging, _ENTRY_FILE), "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        if os.path.exists(entry):
            shutil.rmtree(entry)
        os.rename(staging, entry)
    except Exception as exc:  # a cache never stops a load
        log.warning("could not write the ISQ cache entry %s: %s", entry, exc)
        shutil.rmtree(staging, ignore_errors=True)
        return None
    _remove_stale(cache_dir, key, keep=entry)
    log.info("ISQ cache: wrote %d arrays to %s", len(leaves), entry)
    return entry


def _remove_stale(cache_dir: str, key: dict[str, Any], keep: str) -> None:
    for name in os.listdir(cache_dir):
        other = os.path.join(cache_dir, name)
        if other == keep or not os.path.isdir(other) or ".partial-" in name:
            continue
        try:
            old = _read_entry(other)["key"]
        except Exception:
            continue  # not ours, or unreadable: leave it alone
        if old.get("source") == key.get("source") and old.get("isq_type") == key.get("isq_type"):
            log.info("ISQ cache: removing stale entry %s (the source file changed)", other)
            shutil.rmtree(other, ignore_errors=True)


def load_isq_cache(cache_dir: str, key: dict[str, Any]) -> Any | None:
    """The arrays saved for `key` (numpy, same nesting), or None on a miss.

    A miss is silent when there is no entry; an entry with another key, or one that fails
    to restore or to match its recorded shapes, dtypes and checksums, gives a warning.
    """
    key = _canonical(key)
    entry = _entry_dir(cache_dir, key)
    if not os.path.isdir(entry):
        log.info("ISQ cache: no entry for %s (%s) in %s", key.get("source"), key.get("isq_type"), cache_dir)
        return None
    try:
        record = _read_entry(entry)
        if record.get("key") != key:
            log.warning("ISQ cache entry %s was made for another source or settings; ignoring it", entry)
            return None
        import orbax.checkpoint as ocp

        with ocp.PyTreeCheckpointer() as checkpointer:
            flat = checkpointer.restore(os.path.join(entry, _ARRAYS_DIR))
        leaves = []
        for i, leaf in enumerate(record["leaves"]):
            array = np.asarray(flat[f"leaf{i:06d}"])
            if (list(array.shape) != leaf["shape"] or array.dtype.str != leaf["dtype"]
                    or _crc(array) != leaf["crc32"]):
                raise ValueError(f"array {'.'.join(leaf['path'])} does not match its recorded shape, dtype or "
                                 "checksum")
            leaves.append((leaf["path"], array))
        if len(flat) != len(leaves):
            raise ValueError(f"{len(flat)} arrays stored but {len(leaves)} recorded")
    except Exception as exc:
        log.warning("ISQ cache entry %s is unreadable or damaged (%s); ignoring it and quantizing again", entry, exc)
        return None
    log.info("ISQ cache: restored %d arrays from %s", len(leaves), entry)
    return _unflatten(leaves)
