"""Model-source resolution: --token-source forms, the default model, local paths, the Hub.

No hub is reachable here, so Hub tests use what works without one: HF_HUB_OFFLINE, an
endpoint on a closed local port, and huggingface_hub's own cache layout
(models--ORG--NAME/refs/main + snapshots/COMMIT/) filled by hand.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mistralrs_jax.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from mistralrs_jax.loading.hub import default_model_path, resolve_model_files, resolve_token, resolve_tokenizer_source
from mistralrs_jax.loading.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- tokens


def test_token_source_none_and_literal():
    assert resolve_token("none") is None
    assert resolve_token("literal:hf_literal_value") == "hf_literal_value"


def test_token_source_env_set(monkeypatch):
    monkeypatch.setenv("MY_HF_TOKEN_FOR_TEST", "  hf_from_env\n")
    assert resolve_token("env:MY_HF_TOKEN_FOR_TEST") == "hf_from_env"


def test_bare_env_reads_mistralrs_default_variable(monkeypatch):
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_default_var")
    assert resolve_token("env") == "hf_default_var"


def test_token_source_env_missing_warns_or_raises(monkeypatch, caplog):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR_XYZ", raising=False)
    with caplog.at_level(logging.WARNING, logger="mistralrs_jax.loading.hub"):
        assert resolve_token("env:NO_SUCH_TOKEN_VAR_XYZ") is None  # mistral.rs: no token, go on
    assert "NO_SUCH_TOKEN_VAR_XYZ" in caplog.text
    with pytest.raises(ModelLoadError, match="NO_SUCH_TOKEN_VAR_XYZ is not set"):
        resolve_token("env:NO_SUCH_TOKEN_VAR_XYZ", strict=True)


def test_token_source_path(tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text("hf_from_file\n\n")
    assert resolve_token(f"path:{token_file}") == "hf_from_file"
    missing = tmp_path / "absent"
    with caplog.at_level(logging.WARNING, logger="mistralrs_jax.loading.hub"):
        assert resolve_token(f"path:{missing}") is None
    assert str(missing) in caplog.text
    with pytest.raises(ModelLoadError, match="cannot read the token file"):
        resolve_token(f"path:{missing}", strict=True)


def test_token_source_cache_follows_huggingface_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_cached_login")
    assert resolve_token("cache") == "hf_cached_login"


@pytest.mark.parametrize("bad", ["", "foo", "token:abc", "literal:", "path:", "cache:x", "none:y"])
def test_token_source_bad_syntax(bad):
    with pytest.raises(InvalidRequestError, match="token source"):
        resolve_token(bad)


# --------------------------------------------------------------------------- default model


def test_default_model_path_is_the_smollm2_gguf(smollm2_gguf_path):
    path = default_model_path()
    assert os.path.samefile(path, smollm2_gguf_path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    resolved = resolve_model_files(None)
    assert (resolved.kind, resolved.gguf_path, resolved.source) == ("gguf", path, "default")
    assert resolved.display_name == "SmolLM2-135M-Instruct.Q4_1"


# --------------------------------------------------------------------------- local paths


def test_local_gguf_file(smollm2_gguf_path):
    resolved = resolve_model_files(smollm2_gguf_path, kind="gguf")
    assert resolved.kind == "gguf" and os.path.samefile(resolved.gguf_path, smollm2_gguf_path)
    assert resolved.display_name == "SmolLM2-135M-Instruct.Q4_1"


def test_local_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match=r"not a GGUF \(or legacy GGML\) file"):
        resolve_model_files(str(fake))


def test_local_dir_with_gguf(tmp_path, smollm2_gguf_path):
    (tmp_path / "smol.gguf").symlink_to(smollm2_gguf_path)
    assert resolve_model_files(str(tmp_path)).gguf_path == str(tmp_path / "smol.gguf")
    assert resolve_model_files(str(tmp_path), gguf_file="smol.gguf").gguf_path == str(tmp_path / "smol.gguf")
    with pytest.raises(ModelNotFoundError, match=r"other\.gguf not found.*smol\.gguf"):
        resolve_model_files(str(tmp_path), gguf_file="other.gguf")
    (tmp_path / "second.gguf").symlink_to(smollm2_gguf_path)
    with pytest.raises(InvalidRequestError, match="several GGUF files"):
        resolve_model_files(str(tmp_path))


def test_local_hf_layout_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        resolve_model_files(str(tmp_path), kind="plain")
    (tmp_path / "model.safetensors").write_bytes(b"")
    resolved = resolve_model_files(str(tmp_path))
    assert (resolved.kind, resolved.model_dir, resolved.display_name) == ("plain", str(tmp_path), tmp_path.name)


def test_empty_dir(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file nor"):
        resolve_model_files(str(tmp_path))


@pytest.mark.parametrize("path", ["./missing/model.gguf", "/no/such/dir", "missing.gguf", "../no-such-model-dir/x", "~/no-such-model"])
def test_missing_local_path_fails_fast(path):
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="model path not found"):
        resolve_model_files(path)
    assert time.monotonic() - started < 1.0


def test_local_paths_never_read_the_token(smollm2_gguf_path, monkeypatch, caplog):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR_XYZ", raising=False)
    with caplog.at_level(logging.WARNING, logger="mistralrs_jax.loading.hub"):
        resolve_model_files(smollm2_gguf_path, token_source="env:NO_SUCH_TOKEN_VAR_XYZ")
    assert "NO_SUCH_TOKEN_VAR_XYZ" not in caplog.text


# --------------------------------------------------------------------------- the Hub


def test_repo_id_gguf_needs_a_file_name():
    with pytest.raises(InvalidRequestError, match="-f/--quantized-filename"):
        resolve_model_files("TheBloke/zephyr-7B-beta-GGUF", kind="gguf")


@pytest.mark.parametrize("gguf_file", ["model.Q4_0.gguf", None])
def test_offline_repo_id_fails_fast_and_clearly(monkeypatch, tmp_path, gguf_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_files("some-org/some-model", gguf_file=gguf_file)
    assert time.monotonic() - started < 3.0
    message = str(info.value)
    assert "some-org/some-model" in message and "HF_HUB_OFFLINE" in message
    if gguf_file:
        assert gguf_file in message


def _closed_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed once the socket is: connecting is refused


def test_unreachable_hub_fails_fast_and_clearly(tmp_path):
    # A fresh interpreter: huggingface_hub reads HF_ENDPOINT when it is imported.
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{_closed_local_port()}", HF_HUB_CACHE=str(tmp_path))
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "from mistralrs_jax.loading.hub import resolve_model_files\n"
        "try:\n"
        "    resolve_model_files('some-org/some-model-GGUF', gguf_file='m.Q4_0.gguf', token_source='none')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert time.monotonic() - started < 10.0, "an unreachable hub must not be retried for long"
    assert result.stdout.startswith("ModelNotFoundError"), result.stdout + result.stderr
    assert "unreachable" in result.stdout and "some-org/some-model-GGUF" in result.stdout
    assert "m.Q4_0.gguf" in result.stdout


def _fill_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """huggingface_hub's cache layout for one model repo at COMMIT on branch main."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if isinstance(content, Path):
            (snapshot / name).symlink_to(content)
        else:
            (snapshot / name).write_bytes(content)
    return snapshot


def test_offline_uses_the_hub_cache(monkeypatch, tmp_path, smollm2_gguf_path):
    snapshot = _fill_hub_cache(tmp_path, "test-org/smol-GGUF", {"smol.Q4_1.gguf": Path(smollm2_gguf_path)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    resolved = resolve_model_files("test-org/smol-GGUF", gguf_file="smol.Q4_1.gguf")
    assert resolved.kind == "gguf" and resolved.source == "hub"
    assert resolved.display_name == "test-org/smol-GGUF"
    assert os.path.samefile(resolved.gguf_path, snapshot / "smol.Q4_1.gguf")


def test_offline_plain_model_from_the_hub_cache(monkeypatch, tmp_path):
    snapshot = _fill_hub_cache(tmp_path, "test-org/tiny", {"config.json": b"{}", "model.safetensors": b""})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    resolved = resolve_model_files("test-org/tiny", kind="plain")
    assert resolved.kind == "plain" and os.path.samefile(resolved.model_dir, snapshot)
    assert resolved.display_name == "test-org/tiny"


def test_tokenizer_repo_id_comes_from_the_hub_cache(monkeypatch, tmp_path):
    """`-t/--tok-model-id REPO` (mistral.rs): the repo's tokenizer files, never its weights."""
    from family_fixtures import write_tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    source = tmp_path / "source"
    source.mkdir()
    write_tokenizer(source)
    cache = tmp_path / "cache"
    snapshot = _fill_hub_cache(cache, "test-org/tok", {name: source / name for name in
                                                       ("tokenizer.json", "tokenizer_config.json")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    directory = resolve_tokenizer_source("test-org/tok")
    assert os.path.samefile(directory, snapshot)
    text = "The quick brown fox."
    assert load_tokenizer(directory).encode(text, add_special_tokens=False) == \
        HFTokenizer.from_file(str(source / "tokenizer.json")).encode(text, add_special_tokens=False).ids

    assert resolve_tokenizer_source(str(source)) == str(source)  # a local directory is used as is
    _fill_hub_cache(cache, "test-org/no-tok", {"config.json": b"{}"})
    with pytest.raises(ModelNotFoundError, match="test-org/no-tok has no tokenizer.json"):
        resolve_tokenizer_source("test-org/no-tok")
    with pytest.raises(ModelNotFoundError, match="test-org/missing"):
        resolve_tokenizer_source("test-org/missing")
