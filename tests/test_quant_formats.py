"""GGML block formats against the references that define them.

- llama.cpp's own C code (libggml from llama-cpp-python, tests/libggml.py): dequantization
  of every block type bit for bit (the IQ/TQ/NVFP4 types too, which the package decodes
  through gguf-py), the K-quant, IQ4 and Q8_K reference quantizers byte for byte.
- gguf-py (`gguf.quants`): dequantization of the types the package decodes itself, and
  quantization of the float types, Q4_0..Q8_0 and MXFP4, byte for byte.
- llama.cpp's test-quantize-fns thresholds on its synthetic data, plus per-type error
  bounds on Gaussian data.
- The int8 affine form evaluated in numpy and in XLA gives exactly `dequantize`.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape
from gguf import quants as gguf_quants

from libggml import libggml as load_libggml
from peers import missing_peer

from mistralrs_jax.errors import CorruptModelFileError, NotSupportedError
from mistralrs_jax.quant import QTYPES, dequantize, ggml_type, nbytes, qtype_name, quantize, to_affine_int8

F32 = np.float32

# Byte offsets of the f16 scale fields inside one block (ggml-common.h).
F16_SCALE_OFFSETS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q8_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,),
    "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
}
# Types with an exact int8 affine form, and their group size.
AFFINE_GROUP = {
    "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q8_1": 32,
    "Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16, "Q8_K": 32,
    "IQ4_NL": 32, "IQ4_XS": 32, "MXFP4": 32,
}
GGUF_QUANTIZES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]
LLAMA_CPP_QUANTIZES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "Q8_1"]
OWN_QUANTIZERS = GGUF_QUANTIZES + LLAMA_CPP_QUANTIZES


def _sane_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 scales of both signs over many magnitudes, some zero, as (n, 2) bytes."""
    values = rng.standard_normal(n) * np.exp2(rng.integers(-20, 2, n))
    values[rng.random(n) < 0.05] = 0.0
    return values.astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng: np.random.Generator, name: str, n_blocks: int) -> np.ndarray:
    """Random bytes that are a valid tensor of type `name`: every bit pattern is a valid
    quant, only the float scale fields must be kept finite."""
    block_size, type_size = QTYPES[name]
    if name in ("F32", "F16", "BF16"):
        values = (rng.standard_normal(n_blocks) * 10.0).astype(F32)
        return np.asarray(quantize(values, name)).reshape(n_blocks, type_size)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS.get(name, ()):
        raw[:, offset : offset + 2] = _sane_f16(rng, n_blocks)
    if name == "Q8_K":  # f32 d
        raw[:, 0:4] = (rng.standard_normal(n_blocks) * 1e-3).astype(F32).view(np.uint8).reshape(n_blocks, 4)
    if name == "MXFP4":  # E8M0 exponent: keep 2**(e-128) * 12 finite and not subnormal-only
        raw[:, 0] = rng.integers(100, 150, n_blocks)
    if name == "IQ1_M":  # the f16 scale is spread over the top nibbles of 4 uint16
        bits = _sane_f16(rng, n_blocks).view(np.uint16)[:, 0]
        scales = raw[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            scales[:, i] = (scales[:, i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        raw[:, 48:56] = scales.view(np.uint8)
    return raw


def awkward_rows(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Rows that hit the quantizers' edge cases: zeros, constants, exact ties, a single
    spike, tiny values whose f16 scale underflows, huge values, and plain Gaussians."""
    rows = [rng.standard_normal(cols) * 10.0 ** rng.uniform(-3, 3) for _ in range(10)]
    rows.append(np.zeros(cols))
    rows.append(np.full(cols, 0.75))
    rows.append(np.full(cols, -3.0))
    rows.append(rng.integers(-16, 17, cols) / 4.0)  # many exact .5 ties after scaling
    rows.append(rng.integers(-3, 4, cols) * 1.0)
    spike = np.zeros(cols)
    spike[rng.integers(0, cols, 3)] = [5.0, -2.0, 1e-3]
    rows.append(spike)
    rows.append(rng.standard_normal(cols) * 1e-9)
    rows.append(rng.standard_normal(cols) * 3e4)
    rows.append(np.abs(rng.standard_normal(cols)) + 2.0)  # all positive: min clamps to 0
    rows.append(-np.abs(rng.standard_normal(cols)) - 2.0)
    half_zero = rng.standard_normal(cols)
    half_zero[: cols // 2] = 0.0
    rows.append(half_zero)
    rows.append(rng.standard_t(3, cols) * 0.02)  # weight-like heavy tails
    return np.stack(rows).astype(F32)


def _gguf_dequantize(raw: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    rows = raw.reshape(shape[0], -1)
    return np.asarray(gguf_quants.dequantize(rows, GGMLQuantizationType[name]), dtype=F32)


# ---------------------------------------------------------------- llama.cpp's libggml


@pytest.fixture(scope="module")
def libggml():
    return load_libggml()


# ---------------------------------------------------------------- type table


def test_qtypes_match_ggml_sizes():
    for name, (block_size, type_size) in QTYPES.items():
        if name == "Q8_1":
            # ggml-common.h: static_assert(sizeof(block_q8_1) == 2*sizeof(ggml_half) + QK8_1);
            # gguf-py's table still has the old f32 layout (40 bytes).
            assert (block_size, type_size) == (32, 36)
            continue
        assert (block_size, type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[name]], name
        shape = (3, 2 * block_size)
        assert nbytes(name, shape) == int(np.prod(quant_shape_to_byte_shape(shape, GGMLQuantizationType[name])))


def test_type_names_and_ids():
    for name in QTYPES:
        assert ggml_type(name) is GGMLQuantizationType[name]
        assert qtype_name(int(GGMLQuantizationType[name])) == name
        assert qtype_name(GGMLQuantizationType[name]) == name
    assert qtype_name("q4_k") == "Q4_K"
    assert qtype_name("Q6K") == "Q6_K"  # mistral.rs' ISQ spelling
    with pytest.raises(NotSupportedError, match="supported types"):
        qtype_name("Q4_K_M")
    with pytest.raises(NotSupportedError):
        qtype_name(9999)


# ---------------------------------------------------------------- dequantize


# Decoded by gguf-py inside the package (quant/formats.py): comparing those with gguf-py would
# compare it with itself, so only llama.cpp judges them.
GGUF_PY_DECODED = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "NVFP4")


def _random_tensor(name: str) -> tuple[np.ndarray, tuple[int, int]]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    block_size, _ = QTYPES[name]
    shape = (6, 4 * block_size if block_size > 1 else 96)
    return random_blocks(rng, name, shape[0] * shape[1] // block_size), shape


@pytest.mark.parametrize("name", [n for n in QTYPES if n not in ("F32", "Q8_1")])
def test_dequantize_matches_llama_cpp(libggml, name):
    """Every block type, bit for bit, against ggml's dequantize_row_* (Q8_1 has none: see below)."""
    raw, shape = _random_tensor(name)
    ours = dequantize(raw, name, shape)
    assert ours.dtype == F32 and ours.shape == shape
    reference = libggml.dequantize(raw, name, shape[0] * shape[1]).reshape(shape)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("name", [n for n in QTYPES if n not in ("Q8_1", "Q8_K", *GGUF_PY_DECODED)])
def test_dequantize_matches_gguf(name):
    raw, shape = _random_tensor(name)
    np.testing.assert_array_equal(dequantize(raw, name, shape), _gguf_dequantize(raw, name, shape))


def test_dequantize_q8_1_is_q8_0_plus_a_sum_field():
    # block_q8_1 = {f16 d, f16 s, int8 qs[32]}: the value is d * qs, the Q8_0 formula.
    rng = np.random.default_rng(1)
    raw = random_blocks(rng, "Q8_1", 64)
    as_q8_0 = np.concatenate([raw[:, 0:2], raw[:, 4:36]], axis=1)
    np.testing.assert_array_equal(dequantize(raw, "Q8_1", (2, 1024)), _gguf_dequantize(as_q8_0, "Q8_0", (2, 1024)))


def test_dequantize_q8_k_is_an_f32_scale_over_256():
    # block_q8_K = {f32 d, int8 qs[256], int16 bsums[16]}; with d exactly representable in
    # f16 the block equals eight Q8_0 blocks with that d.
    rng = np.random.default_rng(2)
    raw = random_blocks(rng, "Q8_K", 16)
    d16 = _sane_f16(rng, 16)
    raw[:, 0:4] = d16.view(np.float16).astype(F32).view(np.uint8).reshape(16, 4)
    as_q8_0 = np.concatenate([np.repeat(d16, 8, axis=0), raw[:, 4:260].reshape(128, 32)], axis=1)
    np.testing.assert_array_equal(dequantize(raw, "Q8_K", (4, 1024)), _gguf_dequantize(as_q8_0, "Q8_0", (4, 1024)))


def test_dequantize_accepts_typed_arrays_and_nd_shapes():
    # GGUFReader hands F32/F16 tensors over as float arrays, quantized ones as uint8 rows.
    x = np.arange(24, dtype=F32).reshape(2, 3, 4)
    np.testing.assert_array_equal(dequantize(x.astype(np.float16), "F16", (2, 3, 4)), x)
    np.testing.assert_array_equal(dequantize(x, "F32", (2, 3, 4)), x)
    values = np.random.default_rng(4).standard_normal((3, 2, 64)).astype(F32)
    raw = quantize(values, "Q8_0")
    assert raw.shape == (3, 2, 68)
    flat = dequantize(raw.reshape(-1), "Q8_0", (6, 64))
    np.testing.assert_array_equal(dequantize(raw, "Q8_0", (3, 2, 64)), flat.reshape(3, 2, 64))


# ---------------------------------------------------------------- quantize


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # gguf-py, on the 3e4 row
@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_quantize_matches_gguf(name):
    rng = np.random.default_rng(10)
    x = awkward_rows(rng, 512)
    ours = quantize(x, name)
    ref = np.asarray(gguf_quants.quantize(x, GGMLQuantizationType[name]))
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], nbytes(name, (1, 512)))
    np.testing.assert_array_equal(ours, np.ascontiguousarray(ref).view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("name", LLAMA_CPP_QUANTIZES + ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantize_matches_llama_cpp(libggml, name):
    rng = np.random.default_rng(11)
    x = np.concatenate(
        [awkward_rows(rng, 1024), rng.standard_normal((32, 1024)), rng.standard_t(3, (32, 1024)) * 0.02]
    ).astype(F32)
    ours = quantize(x, name)
    ref = libggml.quantize(x, name)
    same_blocks = np.all(ours.reshape(-1, QTYPES[name][1]) == ref.reshape(-1, QTYPES[name][1]), axis=1)
    assert same_blocks.all(), f"{(~same_blocks).sum()} of {same_blocks.size} {name} blocks differ from llama.cpp"


# Relative RMS error of quantize -> dequantize on N(0, 1) data (32 x 2048). For a uniform
# grid it is about step / sqrt(12) / rms, with step = range of a group / levels: e.g.
# Q8_0 ~ 2 * 2.2 / 254 / 3.46 = 0.5%, Q4_0 ~ 8.6%. Bounds are the measured values + ~10%.
GAUSSIAN_REL_RMS_BOUND = {
    "F32": 0.0, "F16": 3e-4, "BF16": 2e-3,
    "Q4_0": 0.095, "Q4_1": 0.086, "Q5_0": 0.047, "Q5_1": 0.042, "Q8_0": 0.006, "Q8_1": 0.006,
    "Q2_K": 0.33, "Q3_K": 0.167, "Q4_K": 0.079, "Q5_K": 0.040, "Q6_K": 0.020, "Q8_K": 0.0077,
    "IQ4_NL": 0.084, "IQ4_XS": 0.085, "MXFP4": 0.128,
}
# tests/test-quantize-fns.cpp: sqrt(sum of squared errors) / n on x[i] = 0.1 + 2 cos(i),
# n = 4096, must stay below 0.002 (0.0075 for Q2_K, 0.0040 for Q3_K).
LLAMA_CPP_TOTAL_ERROR = {name: 0.002 for name in OWN_QUANTIZERS} | {"Q2_K": 0.0075, "Q3_K": 0.0040}


@pytest.mark.parametrize("name", OWN_QUANTIZERS)
def test_round_trip_error_bounds(name):
    x = np.random.default_rng(0).standard_normal((32, 2048)).astype(F32)
    y = dequantize(quantize(x, name), name, x.shape)
    rel_rms = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))
    assert rel_rms <= GAUSSIAN_REL_RMS_BOUND[name]
    if name not in ("F32", "F16", "BF16"):
        # Nor far below it: that would mean the values kept more precision than the
        # format has (e.g. passed through unquantized), or a bound gone stale.
        assert rel_rms > GAUSSIAN_REL_RMS_BOUND[name] / 2

    n = 32 * 128
    cos_data = (0.1 + 2 * np.cos(np.arange(n, dtype=np.float64))).astype(F32)
    back = dequantize(quantize(cos_data[None, :], name), name, (1, n))[0]
    total_error = np.sqrt(np.sum((back.astype(np.float64) - cos_data) ** 2)) / n
    assert total_error < LLAMA_CPP_TOTAL_ERROR[name]


def test_quantize_rejects_rows_that_do_not_fill_blocks():
    with pytest.raises(NotSupportedError, match="blocks of 256"):
        quantize(np.zeros((4, 576), F32), "Q4_K")
    with pytest.raises(NotSupportedError, match="not supported"):
        quantize(np.zeros((4, 256), F32), "IQ2_XXS")


def test_dequantize_rejects_wrong_sizes():
    raw = np.zeros(34 * 4, np.uint8)
    with pytest.raises(CorruptModelFileError, match="needs 170 bytes"):
        dequantize(raw, "Q8_0", (5, 32))
    with pytest.raises(CorruptModelFileError, match="multiple of 32"):
        dequantize(raw, "Q8_0", (8, 17))


# ---------------------------------------------------------------- int8 affine form


def _evaluate_affine(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, group: int) -> np.ndarray:
    rows, cols = q.shape
    w = q.astype(F32).reshape(rows, cols // group, group) * scale[:, :, None] + offset[:, :, None]
    return w.reshape(rows, cols)


@pytest.mark.parametrize("name", list(AFFINE_GROUP))
def test_to_affine_int8_is_exact(name):
    rng = np.random.default_rng(20)
    block_size, _ = QTYPES[name]
    shape = (3, 2, 2 * block_size)
    raw = random_blocks(rng, name, 3 * 2 * 2)
    form = to_affine_int8(raw, name, shape)
    g = AFFINE_GROUP[name]
    assert form.group_size == g
    assert form.q.dtype == np.int8 and form.q.shape == (6, 2 * block_size)
    assert form.scale.dtype == F32 and form.scale.shape == (6, 2 * block_size // g)
    assert form.offset.dtype == F32 and form.offset.shape == form.scale.shape
    reference = dequantize(raw, name, shape).reshape(6, -1)
    np.testing.assert_array_equal(_evaluate_affine(*form), reference)


def test_to_affine_int8_is_exact_in_xla_and_in_a_matmul():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def evaluate(q, scale, offset):
        rows, cols = q.shape
        groups = q.astype(jnp.float32).reshape(rows, scale.shape[1], -1)
        return (groups * scale[:, :, None] + offset[:, :, None]).reshape(rows, cols)

    @jax.jit
    def matmul(x, q, scale, offset):
        return x @ evaluate(q, scale, offset).T

    rng = np.random.default_rng(21)
    for name in AFFINE_GROUP:
        block_size, _ = QTYPES[name]
        shape = (8, 2 * max(block_size, 256))
        raw = random_blocks(rng, name, shape[0] * shape[1] // block_size)
        w = dequantize(raw, name, shape)
        q, scale, offset, _ = to_affine_int8(raw, name, shape)
        np.testing.assert_array_equal(np.asarray(evaluate(q, scale, offset)), w, err_msg=name)
        x = rng.standard_normal((5, shape[1])).astype(F32)
        expected = x.astype(np.float64) @ w.astype(np.float64).T
        got = np.asarray(matmul(x, q, scale, offset))
        tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T) + 1e-30
        assert np.all(np.abs(got - expected) <= tol), name


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "IQ2_XXS", "IQ3_S", "TQ2_0"])
def test_to_affine_int8_refuses_types_without_an_int8_form(name):
    block_size, _ = QTYPES[name]
    raw = random_blocks(np.random.default_rng(22), name, 2)
    with pytest.raises(NotSupportedError, match="dequantize"):
        to_affine_int8(raw, name, (1, 2 * block_size))


# ---------------------------------------------------------------- speed and a real file


def test_dequantize_whole_model_sized_tensors(libggml, capsys):
    """SmolLM2-sized tensors span many of dequantize's bounded chunks: the result is still
    llama.cpp's, and the int8 form still evaluates to it. The times are printed, not judged."""
    rng = np.random.default_rng(30)
    timings = []
    for name, shape in [("Q8_0", (49152, 576)), ("Q4_K", (576, 1536)), ("IQ4_NL", (1536, 576))]:
        raw = random_blocks(rng, name, shape[0] * shape[1] // QTYPES[name][0])
        start = time.perf_counter()
        ours = dequantize(raw, name, shape)
        mid = time.perf_counter()
        form = to_affine_int8(raw, name, shape)
        end = time.perf_counter()
        np.testing.assert_array_equal(ours, libggml.dequantize(raw, name, ours.size).reshape(shape), err_msg=name)
        np.testing.assert_array_equal(_evaluate_affine(*form), ours, err_msg=name)
        timings.append(
            f"{name} {shape}: dequantize {1e3 * (mid - start):.0f} ms, to_affine_int8 {1e3 * (end - mid):.0f} ms"
        )
    with capsys.disabled():
        print("\n" + "\n".join(timings))


def _smollm2_path() -> str:
    from mistralrs_jax import default_model_path
    from mistralrs_jax.errors import ModelNotFoundError

    try:
        return default_model_path()
    except ModelNotFoundError as exc:
        missing_peer(str(exc))


@pytest.mark.slow
def test_real_model_file(capsys):
    from gguf import GGUFReader

    reader = GGUFReader(_smollm2_path())
    start = time.perf_counter()
    weights = {}
    for tensor in reader.tensors:
        shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dims innermost first
        weights[tensor.name] = dequantize(tensor.data, tensor.tensor_type, shape)
    elapsed = time.perf_counter() - start
    n_values = sum(w.size for w in weights.values())
    with capsys.disabled():
        print(f"\nSmolLM2-135M Q4_1: {len(weights)} tensors, {n_values / 1e6:.0f}M values dequantized in {elapsed:.2f} s")

    by_name = {t.name: t for t in reader.tensors}
    for name in ["token_embd.weight", "blk.0.ffn_down.weight", "blk.7.attn_q.weight", "blk.0.attn_norm.weight"]:
        tensor = by_name[name]
        rows = tensor.data[:2048]  # blocks never straddle rows: the first rows are enough
        ours = weights[name][: len(rows)]
        reference = np.asarray(gguf_quants.dequantize(rows, tensor.tensor_type), dtype=F32)
        np.testing.assert_array_equal(ours, reference.reshape(ours.shape), err_msg=name)
    down = by_name["blk.0.ffn_down.weight"]
    form = to_affine_int8(down.data, down.tensor_type, weights["blk.0.ffn_down.weight"].shape)
    np.testing.assert_array_equal(_evaluate_affine(*form), weights["blk.0.ffn_down.weight"])
