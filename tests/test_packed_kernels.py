"""Packed quantized weights: every format's XLA reference against gguf-py's dequantizer, the
Pallas kernel (interpret mode) and the CPU kernel against the reference, Triton lowering, and
the one dispatch that chooses between them.

The reference must be bit-exact: it is the definition the kernels are held to. Shapes are odd
on purpose (output rows not a multiple of 16, a single block per row, rows that fall back to
another format under ISQ).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from mistralrs_jax.errors import NotSupportedError
from mistralrs_jax.quant import PACKED_TYPES, PackedWeight, dequantize, quantize, quantize_packed
from mistralrs_jax.quant.hqq import hqq_dequantize, hqq_pack, hqq_quantize, hqq_unpack
from mistralrs_jax.quant.isq import quantize_weight
from pallas_kernels import quant_matmul as qmatmul
from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.quant_blocks import FORMATS
from pallas_kernels.quant_matmul_pallas import quant_matmul_pallas
from peers import not_applicable

TRITON_CALL = "__gpu$xla.gpu.triton"
GGUF_TYPES = [t for t in FORMATS if not t.startswith("HQQ")]
# gguf-py decodes neither Q8_K nor Q8_1 (activation formats that ISQ can write): our numpy
# codec, checked against llama.cpp in test_quant_formats.py, is the reference there.
GGUF_PY_DECODES = [t for t in GGUF_TYPES if t not in ("Q8_K", "Q8_1")]


def _random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid blocks from quantizing heavy-tailed rows (outliers reach the extreme codes)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (rows, cols)) * 0.05).astype(np.float32)
    return quantize_packed(w, qtype).blocks


@pytest.mark.parametrize("qtype", GGUF_PY_DECODES)
@pytest.mark.parametrize("rows,blocks_per_row", [(7, 1), (13, 3)])
def test_reference_equals_gguf_py(qtype, rows, blocks_per_row):
    block_elems = FORMATS[qtype].block_elems
    blocks = _random_blocks(qtype, rows, block_elems * blocks_per_row, seed=rows)
    expected = np.asarray(gguf_quants.dequantize(blocks, GGMLQuantizationType[qtype]), np.float32)
    np.testing.assert_array_equal(np.asarray(qmatmul.dequantize_blocks(blocks, qtype)), expected)


@pytest.mark.parametrize("qtype", PACKED_TYPES)
def test_reference_equals_the_numpy_codec(qtype):
    w = np.random.default_rng(1).standard_normal((5, 2 * FORMATS[qtype].block_elems)).astype(np.float32)
    packed = quantize_packed(w, qtype)
    np.testing.assert_array_equal(np.asarray(qmatmul.dequantize_blocks(packed.blocks, qtype)), packed.dequantize())


def test_packed_types_are_the_kernel_formats():
    assert set(PACKED_TYPES) == set(FORMATS)
    for qtype in PACKED_TYPES:
        w = np.zeros((1, FORMATS[qtype].block_elems), np.float32)
        assert quantize_packed(w, qtype).blocks.shape == (1, FORMATS[qtype].type_size)


def test_isq_fallback_rows_are_packed_in_the_fallback_format():
    """576 columns (SmolLM2) fill no 256-block: Q4K falls back to Q5_0 as llama.cpp does, and the
    packed bytes are exactly gguf-py's Q5_0 bytes."""
    w = np.random.default_rng(2).standard_normal((9, 576)).astype(np.float32)
    packed = quantize_weight(w, "Q4K")
    assert packed.qtype == "Q5_0"
    np.testing.assert_array_equal(packed.blocks, gguf_quants.quantize(w, GGMLQuantizationType.Q5_0))
    np.testing.assert_array_equal(np.asarray(qmatmul.dequantize_blocks(packed.blocks, "Q5_0")),
                                  gguf_quants.dequantize(packed.blocks, GGMLQuantizationType.Q5_0))
    assert quantize_weight(w[:, :96], "HQQ4").qtype == "Q4_1"  # 96 is not a multiple of HQQ's 64


@pytest.mark.parametrize("bits", [4, 8])
def test_hqq_layout_round_trip(bits):
    """The packed HQQ layout holds HQQ's codes and f16 meta: it dequantizes to HQQ's own values
    within the f16 rounding of scale and zero point."""
    w = np.random.default_rng(3).standard_normal((6, 192)).astype(np.float32)
    weights = hqq_quantize(w, bits)
    blocks = hqq_pack(weights)
    assert blocks.shape == (6, 3 * (4 + 64 * bits // 8))
    ours = hqq_unpack(blocks, bits, 192)
    exact = hqq_dequantize(weights)
    step = np.repeat(1.0 / weights.inv_scale, 64, axis=1)
    assert np.abs(ours - exact).max() <= (2.0 ** -8 * 2 ** bits * step).max()
    np.testing.assert_array_equal(np.asarray(qmatmul.dequantize_blocks(blocks, f"HQQ{bits}")), ours)


def test_bad_shapes_are_typed_errors():
    with pytest.raises(NotSupportedError, match="uint8"):
        PackedWeight(np.zeros((4, 19), np.uint8), "Q4_0", 32)
    with pytest.raises(NotSupportedError, match="no packed layout"):
        PackedWeight(np.zeros((4, 18), np.uint8), "IQ2_XXS", 32)
    with pytest.raises(NotSupportedError, match="packed-weight kernel"):
        qmatmul.dequantize_blocks(np.zeros((4, 18), np.uint8), "TQ1_0")


# -- the matmul implementations ----------------------------------------------------------------

def _matmul_case(qtype: str, out_features: int, tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    in_features = 2 * FORMATS[qtype].block_elems if FORMATS[qtype].block_elems == 256 else 192
    blocks = _random_blocks(qtype, out_features, in_features, seed)
    x = rng.standard_normal((tokens, in_features)).astype(np.float32)
    dense = np.asarray(qmatmul.dequantize_blocks(blocks, qtype), np.float64)
    return x, blocks, x.astype(np.float64) @ dense.T


def _assert_close(y, expected, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=rtol,
                               atol=rtol * 10 * np.abs(expected).max())


@pytest.mark.parametrize("qtype", PACKED_TYPES)
def test_pallas_interpret_equals_reference(qtype):
    x, blocks, expected = _matmul_case(qtype, out_features=48, tokens=20, seed=4)
    # Two token tiles and three output tiles, so the grid's edges are exercised.
    _assert_close(quant_matmul_pallas(x, blocks, qtype, interpret=True, block_t=16, block_n=16), expected)
    _assert_close(qmatmul.quant_matmul(x, blocks, qtype, impl="reference"), expected)


def test_pallas_bf16_activations():
    x, blocks, expected = _matmul_case("Q4_K", out_features=32, tokens=5, seed=5)
    y = quant_matmul_pallas(jnp.asarray(x, jnp.bfloat16), blocks, "Q4_K", interpret=True)
    assert y.dtype == jnp.float32
    _assert_close(y, expected, rtol=3e-2)
    _assert_close(qmatmul.quant_matmul_reference(jnp.asarray(x, jnp.bfloat16), blocks, "Q4_K"), expected, rtol=3e-2)


@pytest.mark.parametrize("qtype", PACKED_TYPES)
def test_pallas_kernel_lowers_for_triton(qtype):
    x, blocks, _ = _matmul_case(qtype, out_features=32, tokens=3, seed=6)
    assert TRITON_CALL in lower_for_cuda(lambda x, b: quant_matmul_pallas(x, b, qtype), x, blocks)


# Activations are quantized to 8 bits per block by the CPU kernel (as llama.cpp does): each
# product's relative error is at most half an int8 step of the block's absmax (1/254), so the
# sum's error is bounded by sum |w| |x| / 254 ~ sqrt(in) rms(w) rms(x) / 254 * sqrt(in).
# 2e-2 of the largest output covers that with margin for in <= 512.
CPU_KERNEL_RTOL = 2e-2


@pytest.mark.parametrize("qtype", PACKED_TYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_cpu_dispatch_matches_reference(qtype, tokens, monkeypatch, caplog):
    monkeypatch.delenv(qmatmul.ENV_VAR, raising=False)
    x, blocks, expected = _matmul_case(qtype, out_features=37, tokens=tokens, seed=7)
    impl = qmatmul.dispatch(qtype)
    if jax.default_backend() == "cpu":
        assert impl == ("cpu-kernel" if qmatmul.cpu_kernel_serves(qtype) else "reference")
        if qtype in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K") and impl != "cpu-kernel":
            print(f"the CPU kernel does not serve {qtype} on this machine: the XLA reference ran")
    y = jax.jit(lambda x, b: qmatmul.quant_matmul(x, b, qtype))(x, blocks)
    _assert_close(y, expected, rtol=CPU_KERNEL_RTOL if impl == "cpu-kernel" else 1e-5)


def test_every_packed_format_runs_in_the_cpu_kernel(monkeypatch):
    """Where the CPU kernel is built it serves every packed format, the ones only ISQ writes
    (Q8_1, Q8_K, HQQ4, HQQ8) included: none falls back to the XLA reference."""
    monkeypatch.delenv(qmatmul.ENV_VAR, raising=False)
    if jax.default_backend() != "cpu" or qmatmul._cpu_kernel() is None:
        not_applicable("needs the CPU backend with the CPU kernel built")
    assert [t for t in PACKED_TYPES if qmatmul.dispatch(t) != "cpu-kernel"] == []


def test_a_format_the_cpu_kernel_lacks_falls_back_with_one_log_line(monkeypatch, caplog):
    """A kernel without some format (here one built without HQQ4) leaves that format to the XLA
    reference, with one log line naming it however often it is dispatched, and the right result."""
    monkeypatch.delenv(qmatmul.ENV_VAR, raising=False)
    kernel = qmatmul._cpu_kernel()
    if jax.default_backend() != "cpu" or kernel is None:
        not_applicable("needs the CPU backend with the CPU kernel built")
    fn, type_id, ids = kernel
    monkeypatch.setattr(qmatmul, "_cpu_kernel", lambda: (fn, type_id, ids - {type_id("HQQ4")}))
    qmatmul._note_reference.cache_clear()
    caplog.set_level(logging.INFO, logger="pallas_kernels.quant_matmul")
    x, blocks, expected = _matmul_case("HQQ4", out_features=9, tokens=3, seed=11)
    try:
        assert [qmatmul.dispatch("HQQ4") for _ in range(3)] == ["reference"] * 3
        assert qmatmul.dispatch("HQQ8") == "cpu-kernel"
        _assert_close(jax.jit(lambda x, b: qmatmul.quant_matmul(x, b, "HQQ4"))(x, blocks), expected)
        lines = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
        assert len(lines) == 1 and "HQQ4" in lines[0] and "XLA reference" in lines[0]
    finally:
        qmatmul._note_reference.cache_clear()


def test_dispatch_env_forces_a_choice(monkeypatch):
    x, blocks, expected = _matmul_case("Q8_0", out_features=16, tokens=2, seed=8)

    def traced(impl):
        monkeypatch.setenv(qmatmul.ENV_VAR, impl)
        return str(jax.make_jaxpr(lambda x: qmatmul.quant_matmul(x, blocks, "Q8_0"))(x))

    assert "pallas_call" in traced("interpret")
    assert "pallas_call" not in traced("reference") and "ffi" not in traced("reference")
    monkeypatch.setenv(qmatmul.ENV_VAR, "cuda")
    with pytest.raises(NotSupportedError, match="interpret"):
        qmatmul.dispatch("Q8_0")


def test_gguf_types_without_a_packed_kernel_are_refused_by_name(tmp_path):
    """An IQ2_XXS projection is refused with the tensor's name, its type and the flag to use;
    --cpu-weights f32 dequantizes it instead."""
    from mistralrs_jax.quant.packed import gguf_projection

    class OneTensor:
        path = "model.gguf"

        def tensor(self, name):
            from mistralrs_jax.loading.gguf import GGUFTensor

            return GGUFTensor(name=name, qtype="IQ2_XXS", shape=(8, 256), data=np.zeros(8 * 66, np.uint8))

    with pytest.raises(NotSupportedError, match=r"blk\.0\.attn_q\.weight.*IQ2_XXS.*--cpu-weights f32"):
        gguf_projection(OneTensor(), "blk.0.attn_q.weight")
    assert gguf_projection(OneTensor(), "blk.0.attn_q.weight", "f32") is None


def test_missing_cpu_kernel_logs_once_and_falls_back(monkeypatch, caplog):
    """Without the CPU kernel the XLA reference serves every format, with one log line."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_kernel(name, *args, **kwargs):
        if name.startswith("mistralrs_jax.quant.cpu_kernel"):
            raise ImportError("simulated: kernel not built")
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv(qmatmul.ENV_VAR, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_kernel)
    monkeypatch.delitem(sys.modules, "mistralrs_jax.quant.cpu_kernel", raising=False)
    qmatmul._cpu_kernel.cache_clear()
    caplog.set_level(logging.WARNING, logger="pallas_kernels.quant_matmul")
    try:
        if jax.default_backend() == "cpu":
            assert qmatmul.dispatch("Q4_0") == "reference" and qmatmul.dispatch("Q8_0") == "reference"
            assert caplog.text.count("no CPU kernel module") == 1
    finally:
        monkeypatch.setattr(builtins, "__import__", real_import)
        qmatmul._cpu_kernel.cache_clear()
