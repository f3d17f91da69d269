"""The CPU quantized-matmul kernel (XLA FFI, mistralrs_jax/quant/cpu_kernel) against gguf-py and llama.cpp.

References: llama.cpp's own CPU functions (libggml-cpu inside llama-cpp-python): its activation
quantizers quantize_row_q8_0/q8_1/q8_K and its dot products ggml_vec_dot_<type>_<q8 type>, which
the kernel must reproduce to f32 summation order; gguf-py's `dequantize` for every format (the
weights), its `quantize` for the 32-block formats and this package's llama.cpp-reference quantizers
for K-quants / IQ4 (realistic rows), random valid blocks (every code and scale bit), and a numpy
model of the kernel's 8-bit activation quantization (ggml's Q8_0 / Q8_1 / Q8_K).

Bound (stated in qmatmul.cc): the kernel computes W . x_hat, where x_hat = da * a per activation
block b of x (32 elements; 256 for the K-quants' Q8_K), a = rint(x * 127 / amax_b) and
da_b = amax_b / 127, rounded to f16 for Q8_0/Q8_1. So |x_hat - x| <= da_b / 2 + 127 |da_b - d_b|
elementwise and, for every output,
    |y - W . x| <= sum_b (da_b / 2 + 127 ulp16(da_b) / 2) * sum_{k in b} |w_k|   (+ f32 rounding).
Against the exact model W . x_hat (same integer arithmetic, summed in f64) and against
llama.cpp's vec_dot the kernel must agree to f32 rounding, a few 1e-6 of the sum of |terms|
(f32 eps times the ~30 roundings on the way): an integer error of one code would show as ~1e-3
of that sum.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from mistralrs_jax.errors import NotSupportedError
from mistralrs_jax.quant import quantize as llamacpp_reference_quantize
from mistralrs_jax.quant import cpu_kernel
from mistralrs_jax.quant.cpu_kernel import build, load_kernel, quant_matmul_cpu, row_bytes
from mistralrs_jax.quant.cpu_kernel.blocks import LAYOUTS, random_blocks
from peers import missing_peer, not_applicable

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]
GGUF_QUANTIZES = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}


@pytest.fixture(scope="module")
def kernel() -> cpu_kernel.Kernel:
    flags = build.cpu_flags()
    if platform.machine() != "x86_64" or not {"avx2", "fma"} <= flags:
        not_applicable(f"the CPU kernel needs x86-64 with AVX2/FMA; this is {platform.machine()} without them")
    return load_kernel("native")  # a build failure here fails the test with the compiler's message


def _quantize_rows(qtype: Q, w: np.ndarray) -> np.ndarray:
    if qtype in GGUF_QUANTIZES:
        return gguf_quants.quantize(w, qtype)
    return llamacpp_reference_quantize(w, qtype.name)


K_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS}
# ggml's vec_dot_type: what llama.cpp quantizes the activations to for each weight type
ACTIVATION_TYPE = {t: "q8_K" if t in K_QUANTS else "q8_1" if t in (Q.Q4_1, Q.Q5_1) else "q8_0" for t in TYPES}


def _group(qtype) -> int:
    return 16 if qtype in (Q.Q2_K, Q.Q3_K, Q.Q6_K) else 32


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)  # round to nearest even, as F16C


def _numpy_activations(x: np.ndarray, qtype):
    """The kernel's activation quantization (ggml's Q8_0 / Q8_1 / Q8_K), modelled in numpy in f32:
    codes a (t, k), and per weight group the block scale da and the offsets' term qa."""
    t, k = x.shape
    group, kind = _group(qtype), ACTIVATION_TYPE[qtype]
    block = 256 if kind == "q8_K" else 32
    blocks = x.reshape(t, k // block, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        if kind == "q8_K":  # the first element of largest magnitude, with its sign
            first = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
            iscale = np.where(amax > 0, np.float32(-127) / first, np.float32(0)).astype(np.float32)
            d = np.where(amax > 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)[..., 0]
        else:
            iscale = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
            d = (amax[..., 0] / np.float32(127)).astype(np.float32)
    a = np.rint(blocks * iscale).astype(np.int8)
    sums = a.reshape(t, k // group, group).astype(np.int32).sum(-1).astype(np.float32)
    per = block // group
    if kind == "q8_K":
        da = np.repeat(d, per, axis=1)
        qa = da * sums
    elif kind == "q8_1":
        da = np.repeat(_f16(d), per, axis=1)
        qa = _f16(np.repeat(d, per, axis=1) * sums)
    else:
        da = np.repeat(_f16(d), per, axis=1)
        qa = da * sums
    return a.reshape(t, k), da.astype(np.float32), qa.astype(np.float32)


def _model(kernel, qtype, w: np.ndarray, x: np.ndarray):
    """The kernel's integer arithmetic in numpy (f64 sums) and the sum of |terms| of each output."""
    (t, k), n = x.shape, w.shape[0]
    u, s, c, group = _unpack(kernel, int(qtype), w, k)
    a, da_g, qa_g = _numpy_activations(x, qtype)
    ug, ag = u.reshape(n, -1, group).astype(np.int64), a.reshape(t, -1, group).astype(np.int64)
    idot = np.einsum("ngi,tgi->tng", ug, ag)
    model = (s[None] * da_g[:, None] * idot + c[None] * qa_g[:, None]).sum(-1)
    u_abs_a = np.einsum("ngi,tgi->tng", ug, np.abs(ag))
    scale = (np.abs(s[None] * da_g[:, None]) * u_abs_a + np.abs(c[None] * qa_g[:, None])).sum(-1)
    return model, scale


def _bound(x: np.ndarray, w_deq: np.ndarray, qtype) -> np.ndarray:
    """The stated bound on |y - W . x| (module docstring)."""
    t, k = x.shape
    block = 256 if qtype in K_QUANTS else 32
    d = np.abs(x.reshape(t, k // block, block)).max(-1) / 127.0
    if block == 32:  # the f16 rounding of d: half an f16 ulp (2^-11 relative, 2^-25 in subnormals)
        d = d / 2 + 127 * np.maximum(d * 2.0**-11, 2.0**-25)
    else:  # f32 scale; x * iscale rounds once more than x / d
        d = d * (0.5 + 1e-4)
    wabs = np.abs(w_deq).reshape(len(w_deq), k // block, block).sum(-1)
    return d @ wabs.T + 1e-5 * (np.abs(x) @ np.abs(w_deq).T)


def _unpack(kernel, qtype: int, w: np.ndarray, k: int):
    """The kernel's own unpacking of each row: codes u and per-group scale s, offset c."""
    n = w.shape[0]
    group = _group(qtype)
    u = np.empty((n, k), np.uint8)
    s = np.empty((n, k // group), np.float32)
    c = np.empty((n, k // group), np.float32)
    ptr = ctypes.c_void_p
    for r in range(n):
        row = np.ascontiguousarray(w[r])
        got = kernel.lib.mj_unpack_row(
            ctypes.c_int64(int(qtype)), ptr(row.ctypes.data), ctypes.c_int64(k),
            ptr(u[r].ctypes.data), ptr(s[r].ctypes.data), ptr(c[r].ctypes.data),
        )
        assert got == group
    return u, s, c, group


def _run(x: np.ndarray, w: np.ndarray, qtype: int, k: int, kern=None) -> np.ndarray:
    fn = jax.jit(lambda x, w: quant_matmul_cpu(x, w, qtype, k, kernel=kern))
    return np.asarray(fn(jnp.asarray(x), jnp.asarray(w)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_unpack_matches_gguf_dequantize(kernel, qtype):
    """s * u + c, the form the dot kernels read, is gguf-py's dequantized weight."""
    block = LAYOUTS[qtype][0]
    k = 2 * max(block, 64)
    w = random_blocks(int(qtype), 7, k, np.random.default_rng(1))
    u, s, c, group = _unpack(kernel, int(qtype), w, k)
    ours = np.repeat(s, group, axis=1) * u + np.repeat(c, group, axis=1)
    ref = gguf_quants.dequantize(w, qtype)
    np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=1e-7 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_activation_quantization_is_exact(kernel, qtype):
    rng = np.random.default_rng(2)
    t, k = 3, 512
    x = (rng.standard_normal((t, k)) * rng.uniform(0.01, 10, size=(t, 1))).astype(np.float32)
    x[1, :256] = 0.0  # all-zero blocks
    x[2, 300] = -40.0  # a negative largest element (Q8_K's scale takes its sign)
    a, da, qa = _kernel_activations(kernel, qtype, x)
    a_ref, da_ref, qa_ref = _numpy_activations(x, qtype)
    np.testing.assert_array_equal(a, a_ref)
    np.testing.assert_array_equal(da, da_ref)
    np.testing.assert_array_equal(qa, qa_ref)


def _kernel_activations(kernel, qtype, x: np.ndarray):
    t, k = x.shape
    group = _group(qtype)
    a = np.empty((t, k), np.int8)
    da = np.empty((t, k // group), np.float32)
    qa = np.empty((t, k // group), np.float32)
    ptr = ctypes.c_void_p
    got = kernel.lib.mj_quantize_rows(ctypes.c_int64(int(qtype)), ptr(x.ctypes.data), ctypes.c_int64(t),
                                      ctypes.c_int64(k), ptr(a.ctypes.data), ptr(da.ctypes.data), ptr(qa.ctypes.data))
    assert got == group
    return a, da, qa


CASES = [  # (T, N, K for 32-blocks, K for 256-blocks): T = 1 is the decode GEMV; odd N and a K tail of 32
    (1, 37, 96, 256),
    (1, 6, 576, 768),  # the GEMV over several 64-element chunks (paired activations) and a tail block
    (2, 7, 576, 768),  # the two-token GEMV (a batch-1 decode step padded to two tokens); a tail row tile
    (3, 5, 576, 768),
    (17, 130, 160, 512),
    (40, 9, 8224, 8448),  # K in several 2048-slices with a tail, tokens in two L2-sized blocks
]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "random_blocks"])
def test_kernel_against_gguf_reference(kernel, qtype, source):
    rng = np.random.default_rng(int(qtype) * 7 + (source == "random_blocks"))
    for t, n, k32, k256 in CASES:
        k = k256 if LAYOUTS[qtype][0] == 256 else k32
        if source == "quantized":
            w = _quantize_rows(qtype, rng.standard_normal((n, k)).astype(np.float32) * 0.05)
        else:
            w = random_blocks(int(qtype), n, k, rng)
        assert w.shape == (n, row_bytes(int(qtype), k))
        x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 4, size=(t, 1))).astype(np.float32)
        y = _run(x, w, int(qtype), k)
        assert y.shape == (t, n) and y.dtype == np.float32

        w_deq = gguf_quants.dequantize(w, qtype).astype(np.float64)
        err = np.abs(y - x.astype(np.float64) @ w_deq.T)
        bound = _bound(x, w_deq, qtype)
        assert (err <= bound).all(), f"{qtype.name} T={t}: worst error/bound {np.max(err / bound):.3f}"

        # The same integer arithmetic in numpy (f64 sums): agreement to f32 rounding.
        model, scale = _model(kernel, qtype, w, x)
        assert (np.abs(y - model) <= 4e-6 * scale + 1e-30).all(), (
            f"{qtype.name} T={t}: kernel vs integer model {np.max(np.abs(y - model) / scale):.2e} of sum |terms|"
        )


class _GgmlCpu:
    """llama.cpp's CPU functions from the libggml-cpu inside llama-cpp-python: the activation
    quantizers its matmul applies to src1 (its type traits' from_float) and its vec_dot kernels."""

    BLOCK = {"q8_0": (32, 34), "q8_1": (32, 36), "q8_K": (256, 292)}  # elements, bytes per block

    def __init__(self):
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            missing_peer("llama-cpp-python (the `peers` extra) is not installed; it carries llama.cpp's CPU kernels")
        path = Path(spec.submodule_search_locations[0]) / "lib" / "libggml-cpu.so"
        if not path.exists():
            missing_peer(f"llama-cpp-python is installed but has no {path.name} in {path.parent}")
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_cpu_init()

    def quantize(self, x: np.ndarray, kind: str) -> np.ndarray:
        fn = getattr(self.lib, f"quantize_row_{kind}")
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        block, nbytes = self.BLOCK[kind]
        out = np.zeros((x.shape[0], x.shape[1] // block * nbytes), np.uint8)
        for t in range(x.shape[0]):
            row = np.ascontiguousarray(x[t], np.float32)
            fn(row.ctypes.data, out[t].ctypes.data, x.shape[1])
        return out

    def matmul(self, qtype, w: np.ndarray, xq: np.ndarray, k: int, kind: str) -> np.ndarray:
        name = Q(qtype).name.lower().replace("_k", "_K")
        fn = getattr(self.lib, f"ggml_vec_dot_{name}_{kind}")
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = None
        y, out = np.empty((xq.shape[0], w.shape[0]), np.float32), ctypes.c_float()
        w = np.ascontiguousarray(w)
        for t in range(xq.shape[0]):
            for n in range(w.shape[0]):
                fn(k, ctypes.byref(out), 0, w[n].ctypes.data, 0, xq[t].ctypes.data, 0, 1)
                y[t, n] = out.value
        return y


@pytest.fixture(scope="module")
def ggml_cpu() -> _GgmlCpu:
    return _GgmlCpu()


def _decode_q8(xq: np.ndarray, kind: str, k: int):
    """ggml's Q8 activation blocks -> codes (t, k) and per block d (and s for Q8_1, bsums for Q8_K)."""
    t = xq.shape[0]
    block, nbytes = _GgmlCpu.BLOCK[kind]
    b = xq.reshape(t, k // block, nbytes)
    if kind == "q8_K":
        d = b[..., :4].copy().view(np.float32)[..., 0]
        return b[..., 4:260].copy().view(np.int8).reshape(t, k), d, b[..., 260:].copy().view(np.int16)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    head = 4 if kind == "q8_1" else 2
    s = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "q8_1" else None
    return b[..., head:].copy().view(np.int8).reshape(t, k), d, s


def activation_rows(seed: int, t: int = 4, k: int = 1024) -> np.ndarray:
    """Rows of very different scales, an all-zero 256-block and a large negative element."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, k)) * rng.uniform(0.001, 30, size=(t, 1))).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 77] = -50.0
    return x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_activations_are_llamacpp_q8(kernel, ggml_cpu, qtype):
    """The kernel quantizes activations exactly as llama.cpp's CPU backend does for the weight type."""
    x = activation_rows(int(qtype) + 20)
    t, k = x.shape
    kind = ACTIVATION_TYPE[qtype]
    codes, d, extra = _decode_q8(ggml_cpu.quantize(x, kind), kind, k)
    a, da, qa = _kernel_activations(kernel, qtype, x)
    group = _group(qtype)
    per = (256 if kind == "q8_K" else 32) // group
    np.testing.assert_array_equal(a, codes)
    np.testing.assert_array_equal(da, np.repeat(d, per, axis=1))
    if kind == "q8_1":
        np.testing.assert_array_equal(qa, extra)
    elif kind == "q8_K":
        bsums = extra.astype(np.float32).reshape(t, k // group, group // 16).sum(-1)
        np.testing.assert_array_equal(qa, np.repeat(d, per, axis=1) * bsums)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_equals_llamacpp_vec_dot(kernel, ggml_cpu, qtype):
    """Every output is llama.cpp's: its Q8 activations dotted by its vec_dot, up to the order of
    the f32 roundings (a few 1e-6 of the sum of |terms|), at T = 1 and 2 (the GEMV) and T > 2."""
    rng = np.random.default_rng(int(qtype) + 40)
    kind = ACTIVATION_TYPE[qtype]
    for t, n, k32, k256 in [(1, 13, 576, 768), (1, 8, 2112, 2304), (2, 11, 2112, 2304), (5, 9, 576, 768), (19, 6, 4160, 4352)]:
        k = k256 if LAYOUTS[qtype][0] == 256 else k32
        if t == 5:
            w = _quantize_rows(qtype, rng.standard_normal((n, k)).astype(np.float32) * 0.05)
        else:
            w = random_blocks(int(qtype), n, k, rng)
        x = (rng.standard_normal((t, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)  # some large channels
        y = _run(x, w, int(qtype), k)
        ref = ggml_cpu.matmul(qtype, w, ggml_cpu.quantize(x, kind), k, kind)
        _, scale = _model(kernel, qtype, w, x)
        worst = np.max(np.abs(y - ref) / scale)
        assert worst <= 1e-5, f"{qtype.name} T={t} K={k}: kernel vs llama.cpp {worst:.2e} of sum |terms|"


def test_leading_axes_and_many_threads_chunks(kernel):
    """(B, S, K) inputs keep their leading axes; N large enough for every thread to take chunks."""
    rng = np.random.default_rng(5)
    k, n = 256, 1029
    w = random_blocks(int(Q.Q4_K), n, k, rng)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    y = np.asarray(jax.jit(lambda x, w: quant_matmul_cpu(x, w, int(Q.Q4_K), k))(x, w))
    assert y.shape == (2, 3, n)
    # It ran on XLA's intra-op threads: all cores (XLA's default) where there are several.
    assert kernel.lib.mj_pool_threads() >= min(2, os.cpu_count() or 1)
    flat = _run(x.reshape(6, k), w, int(Q.Q4_K), k)
    np.testing.assert_array_equal(y.reshape(6, n), flat)
    # Rows are independent: each output row equals a one-row call (to f32 summation order:
    # rows go through the kernel four at a time, a lone row alone).
    for r in (0, 513, n - 1):
        alone = _run(x.reshape(6, k), w[r : r + 1], int(Q.Q4_K), k)[:, 0]
        np.testing.assert_allclose(flat[:, r], alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())


@pytest.mark.parametrize("isa", ["avx2", "avx2+avxvnni"])
def test_portable_instruction_sets_agree(kernel, isa):
    """The AVX2 paths (without AVX-512) give the same products as the native build."""
    needs = {"avx2": {"avx2"}, "avx2+avxvnni": {"avx2", "avx_vnni"}}[isa]
    if not needs <= build.cpu_flags():
        not_applicable(f"this CPU lacks {sorted(needs - build.cpu_flags())} to run the {isa} build")
    other = load_kernel(isa)
    assert other.isa == isa
    rng = np.random.default_rng(6)
    for qtype in (Q.Q4_1, Q.Q8_0, Q.Q6_K, Q.Q4_K, Q.Q8_1, Q.Q8_K, cpu_kernel.type_id("HQQ4")):
        k = 512
        w = random_blocks(int(qtype), 9, k, rng)
        x = rng.standard_normal((2, k)).astype(np.float32)
        ours, native = _run(x, w, int(qtype), k, other), _run(x, w, int(qtype), k)
        np.testing.assert_allclose(ours, native, rtol=1e-5, atol=1e-5 * np.abs(native).max())


def test_independent_calls_in_one_program(kernel):
    """Several kernel calls XLA may run at once (q, k, v of a layer) each give their own result."""
    rng = np.random.default_rng(9)
    k = 512
    ws = [random_blocks(int(t), n, k, rng) for t, n in ((Q.Q4_1, 300), (Q.Q8_0, 64), (Q.Q6_K, 64))]
    types = (int(Q.Q4_1), int(Q.Q8_0), int(Q.Q6_K))
    x = rng.standard_normal((5, k)).astype(np.float32)

    @jax.jit
    def layer(x, w0, w1, w2):
        return [quant_matmul_cpu(x, w, t, k) for w, t in zip((w0, w1, w2), types)]

    for got, w, t in zip(layer(x, *ws), ws, types):
        np.testing.assert_array_equal(np.asarray(got), _run(x, w, t, k))


def test_concurrent_callers_share_the_spinning_helpers(kernel):
    """The kernel's own helper threads (qmatmul.cc, SpinPool) serve one call at a time; calls
    that find them taken use XLA's pool. Four Python threads issue 60 calls each, of matmuls big
    enough to be split and tiny ones that finish while others are still claiming rows: every
    result equals the same call made alone, and nothing deadlocks."""
    import threading

    rng = np.random.default_rng(11)
    k = 512
    cases = []
    for qtype, n, t in ((Q.Q4_1, 2048, 1), (Q.Q8_0, 8, 3), (Q.Q6_K, 1024, 2), (Q.Q4_K, 96, 7)):
        w = random_blocks(int(qtype), n, k, rng)
        x = rng.standard_normal((t, k)).astype(np.float32)
        fn = jax.jit(functools.partial(quant_matmul_cpu, qtype=int(qtype), K=k))
        cases.append((fn, x, w, np.asarray(fn(x, w))))
    errors: list[str] = []

    def caller(offset: int) -> None:
        for i in range(60):
            fn, x, w, expected = cases[(i + offset) % len(cases)]
            got = np.asarray(fn(x, w))
            if not np.array_equal(got, expected):
                errors.append(f"caller {offset}, call {i}: differs by {np.max(np.abs(got - expected))}")

    threads = [threading.Thread(target=caller, args=(j,)) for j in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a kernel call hung"
    assert not errors, errors[:5]


def test_nan_and_inf_inputs_reach_the_output(kernel):
    """As in an f32 dot: a NaN or infinite activation makes its token's outputs NaN, not finite noise."""
    rng = np.random.default_rng(8)
    k = 256
    w = random_blocks(int(Q.Q4_K), 6, k, rng)
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[0, 40] = np.nan
    x[2, 255] = np.inf
    y = _run(x, w, int(Q.Q4_K), k)
    assert np.isnan(y[0]).all() and np.isnan(y[2]).all() and np.isfinite(y[1]).all()


def test_bad_inputs_are_typed_errors(kernel):
    w = random_blocks(int(Q.Q4_0), 4, 64, np.random.default_rng(0))
    x = np.ones((1, 64), np.float32)
    with pytest.raises(NotSupportedError, match="GGML type 1"):
        quant_matmul_cpu(x, w, int(Q.F16), 64)
    with pytest.raises(ValueError, match="uint8 \\(N, 36\\)"):
        quant_matmul_cpu(x, w[:, :30], int(Q.Q4_0), 64)
    with pytest.raises(ValueError, match="not a multiple"):
        quant_matmul_cpu(np.ones((1, 80), np.float32), w, int(Q.Q4_0), 80)
    with pytest.raises(ValueError, match="last axis"):
        quant_matmul_cpu(np.ones((1, 32), np.float32), w, int(Q.Q4_0), 64)


def test_unavailable_kernel_logs_one_line(kernel, monkeypatch, caplog, tmp_path):
    """No compiler: available() is False with one log line that says why, and nothing raises."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MISTRALRS_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    load_kernel.cache_clear()
    cpu_kernel._default_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mistralrs_jax.quant.cpu_kernel"):
            assert cpu_kernel.cpu_kernel_available() is False
            assert cpu_kernel.supported_types() == set()
        lines = [r for r in caplog.records if r.name == "mistralrs_jax.quant.cpu_kernel"]
        assert len(lines) == 1 and "XLA reference" in lines[0].getMessage() and "no-such-compiler" in lines[0].getMessage()
        with pytest.raises(NotSupportedError, match="unavailable"):
            quant_matmul_cpu(np.ones((1, 64), np.float32), np.zeros((1, 36), np.uint8), int(Q.Q4_0), 64)
    finally:
        load_kernel.cache_clear()
        cpu_kernel._default_kernel.cache_clear()
    monkeypatch.undo()
    assert cpu_kernel.cpu_kernel_available() is True
    assert cpu_kernel.supported_types() == {int(t) for t in TYPES} | {int(Q.Q8_1), int(Q.Q8_K), 1004, 1008}


def test_benchmark_script_runs(kernel, tmp_path):
    from benchmarks import cpu_kernel as bench

    assert bench.main(["--types", "Q4_0,Q4_K", "--tokens", "1,3", "--shapes", "64x256", "--reps", "1",
                       "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("cpu_kernel-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["type"], r["t"]) for r in rows] == [("Q4_0", 1), ("Q4_0", 3), ("Q4_K", 1), ("Q4_K", 3)]
    assert all(r["kernel_ms"] > 0 and r["f32_ms"] > 0 for r in rows)


def test_real_smollm2_tensors(kernel, smollm2_gguf_path):
    """The default model's own Q4_1 projections and Q8_0 embedding (its tied lm_head), with
    activations of a realistic spread: within the stated bound of gguf-py's f32 product."""
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(10)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.ffn_up.weight", "token_embd.weight"):
        t = tensors[name]
        w = np.asarray(t.data)[:4096]  # (rows, row bytes): the lm_head's first 4096 vocabulary rows
        k = int(t.shape[0])
        x = (rng.standard_normal((3, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)  # some large channels
        y = _run(x, w, int(t.tensor_type), k)
        w_deq = gguf_quants.dequantize(w, t.tensor_type).astype(np.float64)
        exact = x.astype(np.float64) @ w_deq.T
        assert (np.abs(y - exact) <= _bound(x, w_deq, t.tensor_type)).all(), name
        rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
        assert rel < 0.02, f"{name}: relative error {rel:.4f}"
