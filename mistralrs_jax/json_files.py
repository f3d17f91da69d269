"""The one reader of the JSON files that come with a model or an adapter (config.json,
tokenizer_config.json, generation_config.json, the safetensors index, adapter_config.json).

One contract everywhere: the file holds a JSON object, returned as a dict. A missing file is
`ModelNotFoundError` unless the caller says it is optional (then {}); an unreadable file,
invalid JSON or a value other than an object is `CorruptModelFileError` naming the file.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import CorruptModelFileError, ModelNotFoundError


def read_json_object(path: str, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path`; {} for a missing file when `missing_ok`."""
    if not os.path.isfile(path):
        if missing_ok:
            return {}
        raise ModelNotFoundError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelFileError(f"{path} is not readable JSON ({exc}); download it again") from exc
    if not isinstance(value, dict):
        raise CorruptModelFileError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value
