"""The CPU kernel on the formats only ISQ writes: Q8_1 and Q8_K (ggml's activation types, held as
weights) and this project's HQQ4/HQQ8 (quant/hqq.py), against llama.cpp and HQQ's definition.

llama.cpp's CPU backend has no vec_dot for Q8_1 or Q8_K weights (its type traits give them only a
quantizer), so the references are its parts: for Q8_1, whose weights are d * q like Q8_0's,
`ggml_vec_dot_q8_0_q8_0` on the same blocks without their s field; for every type, the
activations as llama.cpp's `quantize_row_q8_0` quantizes them (all four take Q8_0 activations,
qmatmul.cc's act_kind says why) and the weights as `dequantize_row_q8_0` / `dequantize_row_q8_K`
decode them. HQQ has no llama.cpp peer: its weights are HQQ's w = (q - zero) * scale, decoded
here from the bytes, and its activations are Q8_0 blocks (two per 64-weight group).

Bound (qmatmul.cc): the kernel computes W . x_hat, with x_hat llama.cpp's 8-bit blocks of x (32
elements, f16 scale), so every output is within
sum_b (d_b / 2 + 127 ulp16(d_b) / 2) sum_{k in b} |w_k| of W . x (test_cpu_kernel._bound), and
equals W . x_hat to f32 rounding: a few 1e-6 of the sum of |terms|.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from libggml import libggml
from test_cpu_kernel import _bound, activation_rows, _decode_q8, _kernel_activations, _run, _unpack, ggml_cpu, kernel

from mistralrs_jax.quant.cpu_kernel import row_bytes, type_id
from mistralrs_jax.quant.cpu_kernel.blocks import LAYOUTS, random_blocks
from mistralrs_jax.quant.packed import quantize_packed

__all__ = ["ggml_cpu", "kernel"]  # fixtures shared with test_cpu_kernel

TYPES = ["Q8_1", "Q8_K", "HQQ4", "HQQ8"]
KIND = "q8_0"  # the activation blocks every one of them takes
HQQ_BITS = {"HQQ4": 4, "HQQ8": 8}


def _q8_1_as_q8_0(w: np.ndarray) -> np.ndarray:
    """Q8_1 blocks (d, s, qs[32]) -> Q8_0 blocks (d, qs[32]): the same weights d * q."""
    b = w.reshape(w.shape[0], -1, 36)
    return np.ascontiguousarray(np.concatenate([b[..., :2], b[..., 4:]], axis=-1).reshape(w.shape[0], -1))


def _weights(name: str, w: np.ndarray, k: int) -> np.ndarray:
    """The f64 weights the blocks hold, by llama.cpp's decoders or HQQ's formula."""
    n = w.shape[0]
    if name == "Q8_1":
        return libggml().dequantize(_q8_1_as_q8_0(w), "Q8_0", n * k).reshape(n, k).astype(np.float64)
    if name == "Q8_K":
        return libggml().dequantize(w, "Q8_K", n * k).reshape(n, k).astype(np.float64)
    b = w.reshape(n, k // 64, -1)
    scale = b[..., 0:2].copy().view(np.float16).astype(np.float64)
    zero = b[..., 2:4].copy().view(np.float16).astype(np.float64)
    payload = b[..., 4:]
    q = np.concatenate([payload & 15, payload >> 4], axis=-1) if HQQ_BITS[name] == 4 else payload
    return ((q.astype(np.float64) - zero) * scale).reshape(n, k)


def _realistic(name: str, n: int, k: int, rng) -> np.ndarray:
    """Blocks quantized from normal rows: llama.cpp's reference quantizers for Q8_1 / Q8_K, HQQ's optimiser."""
    rows = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if name in ("Q8_1", "Q8_K"):
        return libggml().quantize(rows, name)
    return quantize_packed(rows, name).blocks


def _terms(kernel, name: str, w: np.ndarray, codes: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    """Sum over each output's terms |s da u a| + |c qa| as the kernel forms them (its own unpacking),
    the scale of f32 rounding."""
    u, s, c, group = _unpack(kernel, type_id(name), w, k)
    t, n = codes.shape[0], w.shape[0]
    per = k // d.shape[1] // group  # weight groups per activation block
    da = np.repeat(d, per, axis=1)  # (t, k / group)
    a = codes.reshape(t, k // group, group).astype(np.int64)
    qa = da * a.sum(-1)
    u_abs_a = np.einsum("ngi,tgi->tng", u.reshape(n, k // group, group).astype(np.int64), np.abs(a))
    return (np.abs(s[None] * da[:, None]) * u_abs_a + np.abs(c[None] * qa[:, None])).sum(-1)


@pytest.mark.parametrize("name", TYPES)
def test_unpack_matches_the_reference_weights(kernel, name):
    """s * u + c, the form the dot kernels read, is llama.cpp's decoding (HQQ's formula for HQQ)."""
    k = 512
    w = random_blocks(type_id(name), 7, k, np.random.default_rng(1))
    u, s, c, group = _unpack(kernel, type_id(name), w, k)
    ours = np.repeat(s, group, axis=1).astype(np.float64) * u + np.repeat(c, group, axis=1)
    ref = _weights(name, w, k)
    # HQQ's codes and offset cancel where q ~ zero: the f32 rounding is of scale * max(q, zero).
    np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=2e-7 * np.abs(np.repeat(s, group, 1) * 255).max())


@pytest.mark.parametrize("name", TYPES)
def test_activations_are_llamacpp_q8(kernel, ggml_cpu, name):
    """The kernel quantizes activations for these weights exactly as llama.cpp's quantize_row_q8_0 does."""
    x = activation_rows(20)
    t, k = x.shape
    codes, d, _ = _decode_q8(ggml_cpu.quantize(x, KIND), KIND, k)
    a, da, qa = _kernel_activations(kernel, type_id(name), x)
    per = da.shape[1] // d.shape[1]
    np.testing.assert_array_equal(a, codes)
    np.testing.assert_array_equal(da, np.repeat(d, per, axis=1))
    sums = codes.reshape(t, da.shape[1], -1).astype(np.int64).sum(-1)
    np.testing.assert_array_equal(qa, (da * sums.astype(np.float32)).astype(np.float32))


# (T, N, K in 32-element blocks): T = 1, 2 take the fused GEMV, the rest the unpacking path; N not
# a multiple of 4; K in several 2048-element slices with a tail. K rounds up to each type's block.
CASES = [(1, 37, 96), (2, 7, 576), (3, 5, 4160), (17, 130, 160), (64, 9, 8224)]


def _k_for(name: str, k32: int) -> int:
    block = LAYOUTS[type_id(name)][0]
    return -(-k32 // block) * block


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("source", ["quantized", "random_blocks"])
def test_kernel_within_the_bound_and_equal_to_llamacpp_parts(kernel, ggml_cpu, name, source):
    rng = np.random.default_rng(sum(map(ord, name)) + (source == "random_blocks"))
    for t, n, k32 in CASES:
        k = _k_for(name, k32)
        w = random_blocks(type_id(name), n, k, rng) if source == "random_blocks" else _realistic(name, n, k, rng)
        assert w.shape == (n, row_bytes(type_id(name), k))
        x = (rng.standard_normal((t, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)  # some large channels
        y = _run(x, w, type_id(name), k)
        assert y.shape == (t, n) and y.dtype == np.float32

        w_ref = _weights(name, w, k)
        err = np.abs(y - x.astype(np.float64) @ w_ref.T)
        bound = _bound(x, w_ref, Q.Q8_0)
        assert (err <= bound).all(), f"{name} T={t} K={k}: worst error/bound {np.max(err / bound):.3f}"

        codes, d, _ = _decode_q8(ggml_cpu.quantize(x, KIND), KIND, k)
        x_hat = codes.reshape(t, d.shape[1], -1).astype(np.float64) * d[..., None].astype(np.float64)
        exact = x_hat.reshape(t, k) @ w_ref.T
        scale = _terms(kernel, name, w, codes, d, k)
        worst = np.max(np.abs(y - exact) / scale)
        assert worst <= 4e-6, f"{name} T={t} K={k}: kernel vs W . x_hat {worst:.2e} of sum |terms|"


def test_q8_1_equals_llamacpp_q8_0_vec_dot(kernel, ggml_cpu):
    """Q8_1 weights are Q8_0's d * q: every output is ggml_vec_dot_q8_0_q8_0 of the same blocks
    (without s) and llama.cpp's Q8_0 activations, to f32 summation order."""
    rng = np.random.default_rng(41)
    for t, n, k in [(1, 13, 576), (2, 11, 2112), (5, 9, 4160)]:
        w = random_blocks(type_id("Q8_1"), n, k, rng)
        x = (rng.standard_normal((t, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
        y = _run(x, w, type_id("Q8_1"), k)
        xq = ggml_cpu.quantize(x, "q8_0")
        ref = ggml_cpu.matmul(Q.Q8_0, _q8_1_as_q8_0(w), xq, k, "q8_0")
        codes, d, _ = _decode_q8(xq, "q8_0", k)
        worst = np.max(np.abs(y - ref) / _terms(kernel, "Q8_1", w, codes, d, k))
        assert worst <= 1e-5, f"T={t} K={k}: kernel vs llama.cpp {worst:.2e} of sum |terms|"


def test_hqq_from_isq_runs_in_the_kernel(kernel):
    """HQQ blocks as ISQ writes them (zero points anywhere in the code range, f16 scales)."""
    from mistralrs_jax.quant.isq import quantize_weight

    rng = np.random.default_rng(3)
    for name in ("HQQ4", "HQQ8"):
        rows = (rng.standard_t(4, (67, 640)) * 0.05).astype(np.float32)
        packed = quantize_weight(rows, name)
        assert packed.qtype == name
        x = rng.standard_normal((2, 640)).astype(np.float32)
        y = _run(x, packed.blocks, type_id(name), 640)
        w_ref = _weights(name, packed.blocks, 640)
        assert (np.abs(y - x.astype(np.float64) @ w_ref.T) <= _bound(x, w_ref, Q.Q8_0)).all(), name


def test_type_ids(kernel):
    """Every ISQ-only format has an id the built library takes; other names have none."""
    lib = kernel.lib
    assert [type_id(n) for n in TYPES] == [int(Q.Q8_1), int(Q.Q8_K), 1004, 1008]
    assert all(lib.mj_supports(ctypes.c_int64(type_id(n))) for n in TYPES)
    assert type_id("HQQ3") is None and type_id("no such type") is None
    assert not lib.mj_supports(ctypes.c_int64(int(Q.IQ2_XXS)))

