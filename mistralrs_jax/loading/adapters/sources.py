"""Where LoRA adapters come from: local directories, Hugging Face repos, and mistral.rs ordering files.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`, or
`adapter_model.bin`). The user names it by:
- a local directory;
- a Hub repo id (`owner/name`), or a folder inside one (`owner/name/sub/folder`), fetched with
  huggingface_hub honouring `--token-source` like the base model (loading/hub.py).

mistral.rs' `-o/--order` ordering file (docs/ADAPTER_MODELS.md there) is JSON with
`order` (names of the adapters to activate: sub-folders of the `-a` repo or directory),
optional `preload_adapters` ([{"name", "adapter_model_id"}], adapters mistral.rs loads for
activation at runtime), `base_model_id` (the base model when `-m` is not given) and, for
X-LoRA, `layers`. Here the adapters are merged once at load, so what `order` names is what
is merged; an `order` entry may also be {"name": ..., "weight": ...} to scale that adapter
(an extension: mistral.rs has no per-adapter weight), and `adapters` is accepted as another
name for `order`. A preloaded adapter is merged only when `order` names it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from ...errors import InvalidRequestError, ModelNotFoundError
from ...json_files import read_json_object

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"


# --------------------------------------------------------------------------- local and Hub


def _adapter_subfolders(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory)
                  if os.path.isfile(os.path.join(directory, name, CONFIG_FILE)))


def _check_adapter_dir(directory: str, spec: str) -> str:
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        inside = _adapter_subfolders(directory) if os.path.isdir(directory) else []
        hint = (f"; it holds the adapters {', '.join(inside)}: pass one as {spec.rstrip('/')}/NAME, or list them "
                f"in an ordering file (-o)") if inside else "; a PEFT LoRA adapter directory needs one"
        raise ModelNotFoundError(f"LoRA adapter {spec}: {directory} has no {CONFIG_FILE}{hint}")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in (SAFETENSORS_FILE, BIN_FILE)):
        raise ModelNotFoundError(f"LoRA adapter {spec}: {directory} has {CONFIG_FILE} but neither {SAFETENSORS_FILE} "
                                 f"nor {BIN_FILE}; the download is incomplete")
    return directory


def resolve_adapter_dir(spec: str, token_source: str = "cache") -> str:
    """The local directory holding adapter `spec` (a directory, a Hub repo id, or repo id + sub-folder),
    downloading only the adapter's files when it is on the Hub."""
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        return _check_adapter_dir(os.path.abspath(local), spec)
    from ..hub import looks_local

    parts = spec.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    if len(parts) < 2 or looks_local(repo_id) or os.path.isabs(local) or spec.startswith("."):
        raise ModelNotFoundError(f"LoRA adapter not found: {spec} (no such directory, and not a Hugging Face "
                                 "repo id such as owner/name or owner/name/sub-folder)")
    return _check_adapter_dir(_download(repo_id, subfolder, token_source), spec)


def _download(repo_id: str, subfolder: str, token_source: str) -> str:
    from huggingface_hub import snapshot_download

    from ..hub import fetch_from_hub

    prefix = f"{subfolder}/" if subfolder else ""

    def fetch(**hub) -> str:
        root = snapshot_download(repo_id, allow_patterns=[prefix + CONFIG_FILE, prefix + SAFETENSORS_FILE], **hub)
        if not os.path.isfile(os.path.join(root, prefix + SAFETENSORS_FILE)):  # older adapters: a torch pickle
            root = snapshot_download(repo_id, allow_patterns=[prefix + BIN_FILE], **hub)
        return root

    what = f"the LoRA adapter {repo_id}" + (f" (folder {subfolder})" if subfolder else "")
    root = fetch_from_hub(repo_id, what, token_source, fetch)
    return os.path.join(root, subfolder) if subfolder else root


# --------------------------------------------------------------------------- ordering files


@dataclass
class AdapterOrdering:
    """What a mistral.rs ordering file selects: (name, weight) pairs in order, and where names point."""

    entries: list[tuple[str, float]]
    base_model_id: str | None = None
    preload: dict[str, str] = field(default_factory=dict)  # name -> adapter model id


def _weight(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{where}: an adapter weight must be a number, got {value!r}", param="order")
    return float(value)


def read_ordering_file(path: str) -> AdapterOrdering:
    """Parse a mistral.rs LoRA ordering file (see the module docstring)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ModelNotFoundError(f"ordering file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"ordering file {path} is not readable JSON ({exc})", param="order") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError(f"ordering file {path} must hold a JSON object with an \"order\" list", param="order")
    preload = {}
    for item in data.get("preload_adapters") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("adapter_model_id"), str):
            raise InvalidRequestError(f"ordering file {path}: each preload_adapters entry needs \"name\" and "
                                      f"\"adapter_model_id\" strings, got {item!r}", param="order")
        preload[item["name"]] = item["adapter_model_id"]
    listed = data.get("order", data.get("adapters"))
    if listed is None:
        listed = []
    if not isinstance(listed, list):
        raise InvalidRequestError(f"ordering file {path}: \"order\" must be a list of adapter names", param="order")
    entries = []
    for item in listed:
        if isinstance(item, str):
            entries.append((item, 1.0))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            entries.append((item["name"], _weight(item.get("weight", 1.0), f"ordering file {path}")))
        else:
            raise InvalidRequestError(f"ordering file {path}: an \"order\" entry must be an adapter name or "
                                      f"{{\"name\": ..., \"weight\": ...}}, got {item!r}", param="order")
    unused = sorted(set(preload) - {name for name, _ in entries})
    if unused:
        log.warning("ordering file %s: preload_adapters %s are not merged: adapters are merged at load here, and "
                    "runtime activation is not supported; list them in \"order\" to merge them", path,
                    ", ".join(unused))
    base = data.get("base_model_id")
    return AdapterOrdering(entries, base if isinstance(base, str) and base else None, preload)


def _join_spec(base: str, name: str) -> str:
    """`name` inside the adapters location `base` (a local directory, or a Hub repo / folder)."""
    local = os.path.expanduser(base)
    return os.path.join(local, name) if os.path.isdir(local) else f"{base.rstrip('/')}/{name}"


def adapters_from_cli(adapters_model_id: str, order: str | None) -> tuple[list[str], list[float], str | None]:
    """(adapter specs, weights, base model id from the ordering file) for `-a ... [-o FILE]`.

    Without an ordering file `-a` is one adapter or several, comma-separated (each weight 1.0).
    With one, `-a` is the location whose sub-folders the file's `order` names (a preloaded
    adapter is found at its own `adapter_model_id`).
    """
    if order is None:
        specs = [part.strip() for part in adapters_model_id.split(",") if part.strip()]
        if not specs:
            raise InvalidRequestError("-a/--adapters-model-id names no adapter", param="adapters_model_id")
        return specs, [1.0] * len(specs), None
    if "," in adapters_model_id:
        raise InvalidRequestError("with an ordering file (-o), -a names the one location that holds the adapters it "
                                  "lists, not a comma-separated list", param="adapters_model_id")
    ordering = read_ordering_file(order)
    if not ordering.entries:
        raise InvalidRequestError(f"ordering file {order} activates no adapter: its \"order\" list is empty",
                                  param="order")
    specs = [ordering.preload.get(name) or _join_spec(adapters_model_id, name) for name, _ in ordering.entries]
    return specs, [weight for _, weight in ordering.entries], ordering.base_model_id


def base_model_of(spec: str, token_source: str = "cache") -> str:
    """The base model an adapter names in its adapter_config.json (`base_model_name_or_path`)."""
    directory = resolve_adapter_dir(spec, token_source)
    base = read_json_object(os.path.join(directory, CONFIG_FILE)).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidRequestError(f"LoRA adapter {spec} does not name its base model (no base_model_name_or_path in "
                                  f"{CONFIG_FILE}); give it with -m/--model-id", param="model_id")
    return base
