"""The engine with packed quantized weights against the same model dequantized to f32.

SmolLM2-135M Q4_1 (the real default model) is built twice from one GGUF file: projections
packed at the file's bits (the default) and dequantized to f32 (`cpu_weights="f32"`), and
teacher-forced logits of a text are compared.
- With the XLA reference the packed weights are the f32 weights exactly: only the order of
  float sums differs, so logits agree to ~1e-4 of their scale.
- The CPU kernel quantizes activations to 8 bits per block, as llama.cpp does (rounding error
  up to 1/254 of each block's largest activation, through 30 layers), so it is held to
  llama.cpp's own distance from exact f32 on this model: 0.15 mean and 1.5 max |logit
  difference| measured on a 385-token text (tests/test_fidelity_llamacpp.py). This text is
  shorter and a mean over fewer positions, so the mean bound gets 1/3 slack (measured here:
  0.169 mean, 1.08 max, top-1 agreement 0.976).
"""
from __future__ import annotations

import numpy as np
import pytest

from mistralrs_jax.errors import InsufficientMemoryError
from peers import not_applicable

TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes. "
        "Every year millions of visitors walk along the Seine and climb to Montmartre.")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    from mistralrs_jax.loading.gguf import GGUFFile
    from mistralrs_jax.loading.tokenizer import Tokenizer
    from mistralrs_jax.models.model_config import config_from_gguf

    gguf = GGUFFile(smollm2_gguf_path)
    config = config_from_gguf(gguf.metadata, smollm2_gguf_path)
    tokens = Tokenizer.from_gguf_metadata(gguf.metadata).encode(TEXT, add_special_tokens=True)
    return gguf, config, tokens


def build(smollm2, cpu_weights: str):
    from mistralrs_jax.loading.gguf_weights import build_model_from_gguf

    gguf, config, _ = smollm2
    return build_model_from_gguf(gguf, config, cpu_weights=cpu_weights)


def score(model, config, tokens) -> np.ndarray:
    from mistralrs_jax.engine.runner import ModelRunner

    runner = ModelRunner(model, config, num_blocks=8, block_size=16, max_model_len=128, max_num_seqs=1,
                         max_num_batched_tokens=64)
    return np.asarray(runner.score(tokens), np.float64)


@pytest.fixture(scope="module")
def f32_logits(smollm2):
    _, config, tokens = smollm2
    return score(build(smollm2, "f32"), config, tokens)


def test_packed_weights_are_held_at_the_files_size(smollm2):
    from mistralrs_jax.memory import weight_bytes

    gguf, _, _ = smollm2
    model = build(smollm2, "quantized")
    projections = [layer for layer in _linears(model) if layer.quantized]
    assert len(projections) == 30 * 7
    file_bytes = sum(gguf.tensor(n).data.nbytes for n in gguf.tensor_names if gguf.tensor(n).qtype == "Q4_1")
    assert sum(layer.blocks[...].nbytes for layer in projections) == file_bytes  # 5 bits a weight, as in the file
    f32_bytes = weight_bytes(build(smollm2, "f32"))
    print(f"weight_bytes: packed {weight_bytes(model):,}, f32 {f32_bytes:,}, file's Q4_1 projections {file_bytes:,}")
    assert weight_bytes(model) < f32_bytes / 2.5


def _linears(model):
    from flax import nnx

    from mistralrs_jax.models.layers import Linear

    return [node for _, node in nnx.iter_graph(model) if isinstance(node, Linear)]


def test_reference_logits_equal_the_f32_engine(smollm2, f32_logits, monkeypatch):
    monkeypatch.setenv("MISTRALRS_JAX_QMATMUL", "reference")
    _, config, tokens = smollm2
    packed = score(build(smollm2, "quantized"), config, tokens)
    assert np.abs(packed - f32_logits).max() < 1e-4 * np.abs(f32_logits).max()


def test_cpu_kernel_logits_are_within_llama_cpps_distance_from_f32(smollm2, f32_logits, monkeypatch):
    from pallas_kernels.quant_matmul import dispatch

    monkeypatch.delenv("MISTRALRS_JAX_QMATMUL", raising=False)
    if dispatch("Q4_1") != "cpu-kernel":
        not_applicable(f"the quantized matmul here is {dispatch('Q4_1')!r}, not the CPU kernel (covered above)")
    _, config, tokens = smollm2
    packed = score(build(smollm2, "quantized"), config, tokens)
    diff = np.abs(packed - f32_logits)
    agree = float((packed.argmax(-1) == f32_logits.argmax(-1)).mean())
    print(f"CPU kernel vs f32 logits over {len(tokens)} tokens: mean |d| {diff.mean():.3f}, max {diff.max():.3f}, "
          f"top-1 agreement {agree:.3f}")
    assert diff.mean() <= 0.2 and diff.max() <= 1.5
    assert agree >= 0.95


def test_f32_dequantization_that_does_not_fit_is_refused(smollm2, monkeypatch):
    """Before dequantizing a quantized model to f32 the loader checks available memory, and the
    error names the bytes and the flag that avoids them."""
    import mistralrs_jax.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * 2**20)
    with pytest.raises(InsufficientMemoryError, match=r"dequantizing .* needs [\d,]+ bytes .*--cpu-weights quantized"):
        build(smollm2, "f32")
    build(smollm2, "quantized")  # packed: nothing to dequantize but the embedding table
