"""In-situ quantization (ISQ), HQQ, runtime re-quantization and the ISQ cache.

References nobody here wrote: llama.cpp's own quantizers and dequantizers (libggml from
llama-cpp-python, tests/libggml.py) and its llama_model_quantize (which type a tensor of a
given shape falls back to), a GGUF file quantized by gguf-py and loaded through the plain
(non-ISQ) path, llama.cpp's per-type error levels, the f32 model's own logits, the process's
resident memory as the kernel counts it, and the real SmolLM2 model's answer.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from libggml import libggml
from peers import require_peer

from mistralrs_jax.errors import InvalidRequestError, NotSupportedError
from mistralrs_jax.quant import PackedWeight, dequantize, quantize
from mistralrs_jax.quant.hqq import hqq_dequantize, hqq_quantize, hqq_to_affine_int8
from mistralrs_jax.quant.isq import (
    FALLBACK_TYPES,
    GGUF_ISQ_TYPES,
    ISQ_TYPES,
    normalize_isq_type,
    quantize_weight,
    wrap_factory,
)
from mistralrs_jax.quant.isq_cache import isq_cache_key, load_isq_cache, save_isq_cache

F32 = np.float32
REPO = Path(__file__).resolve().parents[1]


def evaluate(quantized) -> np.ndarray:
    """A PackedWeight's values, or an int8 affine form (dict) as f32 evaluated the way ggml does
    (q * scale, then + offset)."""
    if isinstance(quantized, PackedWeight):
        return quantized.dequantize()
    rows, cols = quantized["q"].shape
    g = quantized["group"]
    w = quantized["q"].reshape(rows, cols // g, g).astype(F32) * quantized["scale"][..., None]
    if quantized["offset"] is not None:
        w = w + quantized["offset"][..., None]
    return w.reshape(rows, cols)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(np.mean((a64 - b64) ** 2) / np.mean(b64**2)))


# ---------------------------------------------------------------- names


def test_isq_type_names_follow_mistral_rs():
    assert set(ISQ_TYPES) >= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "Q8K",
                              "HQQ4", "HQQ8"}
    for spelling, canonical in [("q4k", "Q4K"), ("Q4_K", "Q4K"), ("q6_k", "Q6K"), ("Q8_0", "Q8_0"), ("hqq4", "HQQ4"),
                                (" HQQ8 ", "HQQ8"), ("4", "Q4K"), (8, "Q8_0"), ("2", "Q2K")]:
        assert normalize_isq_type(spelling) == canonical, spelling
    with pytest.raises(InvalidRequestError, match="unknown ISQ type 'Q9K'.*Q4K"):
        normalize_isq_type("Q9K")
    with pytest.raises(InvalidRequestError, match="bit count"):
        normalize_isq_type("7")
    with pytest.raises(NotSupportedError, match="Metal"):
        normalize_isq_type("afq4")
    with pytest.raises(InvalidRequestError):
        normalize_isq_type(None)


# ---------------------------------------------------------------- one weight

# Relative RMS error on N(0, 1) weights [64, 2048] at each type's own format; from
# llama.cpp's levels (test_quant_formats.py) and, for HQQ, an RTN 64-group level:
# step/sqrt(12)/rms with step = E[range of 64 normals] (~4.9) / levels.
ISQ_REL_RMS_BOUND = {
    "Q4_0": 0.095, "Q4_1": 0.086, "Q5_0": 0.047, "Q5_1": 0.042, "Q8_0": 0.006, "Q8_1": 0.006,
    "Q2K": 0.33, "Q3K": 0.167, "Q4K": 0.079, "Q5K": 0.040, "Q6K": 0.020, "Q8K": 0.0077,
    "HQQ4": 4.9 / 15 / 12**0.5, "HQQ8": 4.9 / 255 / 12**0.5,
}


@pytest.mark.parametrize("isq_type", ISQ_TYPES)
def test_quantize_weight_error_is_within_the_types_bound(isq_type):
    w = np.random.default_rng(0).standard_normal((64, 2048)).astype(F32)
    quantized = quantize_weight(w, isq_type)
    assert quantized.blocks.dtype == np.uint8 and (quantized.out_features, quantized.in_features) == w.shape
    assert quantized.bits_per_weight <= 9.125  # packed at the type's own size (Q8_K is the widest)
    error = rel_rms(evaluate(quantized), w)
    assert ISQ_REL_RMS_BOUND[isq_type] / 2 < error <= ISQ_REL_RMS_BOUND[isq_type]


@pytest.mark.parametrize("isq_type", list(GGUF_ISQ_TYPES))
def test_gguf_isq_types_are_bit_exact_against_llama_cpp(isq_type):
    """ISQ's weight of each GGUF type evaluates to exactly what llama.cpp's own quantizer
    (ggml_quantize_chunk, or the Q8_K/Q8_1 row reference) and dequantizer make of the weight."""
    rng = np.random.default_rng(1)
    w = np.concatenate([rng.standard_normal((8, 1024)) * 0.02, rng.standard_t(3, (8, 1024)) * 0.05]).astype(F32)
    quantized = quantize_weight(w, isq_type)
    qtype = GGUF_ISQ_TYPES[isq_type]
    assert quantized.qtype == qtype
    ggml = libggml()
    blocks = ggml.quantize(w, qtype)
    if qtype == "Q8_1":  # ggml has no Q8_1 dequantizer: d * q, the Q8_0 formula (test_quant_formats.py)
        blocks = np.concatenate([blocks.reshape(-1, 36)[:, :2], blocks.reshape(-1, 36)[:, 4:]], axis=1)
        qtype = "Q8_0"
    reference = ggml.dequantize(blocks, qtype, w.size).reshape(w.shape)
    np.testing.assert_array_equal(evaluate(quantized), reference)


# llama.cpp's file types whose tensors are all the K type with `pure` (LLAMA_FTYPE_MOSTLY_*).
LLAMA_FTYPES = {"Q2K": 10, "Q3K": 11, "Q4K": 14, "Q5K": 16, "Q6K": 18}


def test_fallback_types_are_what_llama_quantize_writes_for_smollm2_shapes(tmp_path):
    """A SmolLM2-shaped layer (hidden 576 = 2.25 K-blocks, ffn 1536) through llama.cpp's own
    llama_model_quantize (pure: no per-tensor type mix): each projection gets the type ISQ
    picks (the K type or its fallback) and the very values ISQ computes."""
    llama_cpp = require_peer("llama_cpp")
    source = tmp_path / "smollm2-shaped.gguf"
    weights = write_llama_gguf(source, hidden=576, ffn=1536, layers=1, heads=9, kv_heads=3, vocab=256)
    ggml = libggml()
    for isq_type, ftype in LLAMA_FTYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.pure, params.nthread = ftype, True, 1
        target = tmp_path / f"{isq_type}.gguf"
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
        tensors = {t.name: t for t in gguf.GGUFReader(str(target)).tensors}
        for name, w in weights.items():
            theirs = tensors[name]
            ours = quantize_weight(w, isq_type, name=name)
            k_type = GGUF_ISQ_TYPES[isq_type]
            assert theirs.tensor_type.name == (k_type if w.shape[1] % 256 == 0 else FALLBACK_TYPES[k_type]), name
            assert ours.qtype == theirs.tensor_type.name, f"{isq_type} {name}"
            reference = ggml.dequantize(np.asarray(theirs.data), ours.qtype, w.size).reshape(w.shape)
            np.testing.assert_array_equal(evaluate(ours), reference, err_msg=f"{isq_type} {name}")


def test_rows_that_fill_no_block_fall_back_like_llama_cpp(caplog):
    w = np.random.default_rng(2).standard_normal((16, 576)).astype(F32)  # SmolLM2's hidden size: 2.25 K-blocks
    caplog.set_level(logging.INFO, logger="mistralrs_jax.quant.isq")
    for isq_type, gguf_type in GGUF_ISQ_TYPES.items():
        quantized = quantize_weight(w, isq_type, name="blk.0.attn_q.weight")
        expected = FALLBACK_TYPES.get(gguf_type, gguf_type)
        assert quantized.qtype == expected
        np.testing.assert_array_equal(evaluate(quantized), dequantize(quantize(w, expected), expected, w.shape))
    assert "blk.0.attn_q.weight is quantized as Q5_0" in caplog.text
    assert quantize_weight(w, "HQQ4").qtype == "HQQ4"  # 576 = 9 x 64
    assert quantize_weight(w[:, :96], "HQQ4").qtype == "Q4_1"  # 96 fills no 64-group: the 32-block affine type
    assert quantize_weight(w[:, :100], "Q4K", name="odd") is None
    assert "odd keeps source precision" in caplog.text


def test_threads_give_the_same_bytes_as_one_pass():
    w = np.random.default_rng(3).standard_normal((512, 1024)).astype(F32)
    for isq_type in ("Q4K", "Q4_1", "HQQ4"):
        one = quantize_weight(w, isq_type, workers=1)
        many = quantize_weight(w, isq_type, workers=4)
        np.testing.assert_array_equal(one.blocks, many.blocks)


# ---------------------------------------------------------------- HQQ


def min_max_round_to_nearest(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Plain asymmetric RTN: each group's [min, max] cut into 2^bits - 1 steps."""
    groups = w.reshape(-1, group).astype(np.float64)
    low, high = groups.min(1, keepdims=True), groups.max(1, keepdims=True)
    step = (high - low) / (2**bits - 1)
    codes = np.clip(np.round((groups - low) / step), 0, 2**bits - 1)
    return (codes * step + low).reshape(w.shape)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("distribution", ["gaussian", "student_t3", "laplace"])
def test_hqq_beats_round_to_nearest(bits, distribution):
    rng = np.random.default_rng(4)
    shape = (128, 1024)
    w = {"gaussian": lambda: rng.standard_normal(shape) * 0.02,
         "student_t3": lambda: rng.standard_t(3, shape) * 0.02,
         "laplace": lambda: rng.laplace(0, 1, shape)}[distribution]().astype(F32)
    rtn = min_max_round_to_nearest(w, bits, 64) - w
    hqq = hqq_dequantize(hqq_quantize(w, bits, 64)) - w
    assert np.abs(hqq).mean() < 0.98 * np.abs(rtn).mean()
    assert np.sqrt(np.mean(hqq.astype(np.float64) ** 2)) < 0.98 * np.sqrt(np.mean(rtn**2))
    # and never worse in any group, in the mean absolute error its iterations are judged by
    per_group = lambda e: np.abs(e).reshape(-1, 64).mean(1)  # noqa: E731
    assert np.all(per_group(hqq) <= per_group(rtn) * (1 + 1e-3))  # f32 vs f64 evaluation differs ~1e-5


def test_hqq_int8_form_is_its_dequantization():
    w = (np.random.default_rng(5).standard_t(4, (64, 512)) * 0.03).astype(F32)
    for bits in (4, 8):
        weights = hqq_quantize(w, bits)
        assert weights.q.max() <= 2**bits - 1
        form = hqq_to_affine_int8(weights)
        as_dict = {"q": form.q, "scale": form.scale, "offset": form.offset, "group": form.group_size}
        np.testing.assert_allclose(evaluate(as_dict), hqq_dequantize(weights), rtol=0, atol=1e-6 * np.abs(w).max())
    constant = np.full((2, 64), 0.25, F32)
    np.testing.assert_array_equal(hqq_dequantize(hqq_quantize(constant, 4)), constant)


# ---------------------------------------------------------------- a model through the factory


def write_llama_gguf(path: Path, *, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
                     seed: int = 0, qtype: str = "F32", share_layers: bool = False,
                     tied: bool = False) -> dict[str, np.ndarray]:
    """A random llama-architecture GGUF. `qtype` F32/F16, or a type gguf-py quantizes;
    `tied`: no output.weight (the lm_head is the embedding table).

    `share_layers` writes the same random tensors into every layer (a big file from little
    memory). Returns the f32 projection weights by tensor name (layer 0 only when shared).
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    head_dim = hidden // heads

    def normal(shape, scale):
        return (rng.standard_normal(shape, dtype=F32) * F32(scale))

    def stored(w):
        if qtype == "F32" or w.ndim == 1:
            return {"tensor": w}
        if qtype == "F16":
            return {"tensor": w.astype(np.float16)}
        ggml_type = GGMLQuantizationType[qtype]
        return {"tensor": gguf_quants.quantize(w, ggml_type), "raw_dtype": ggml_type}

    def add(name, w):
        kwargs = stored(w)
        writer.add_tensor(name, kwargs.pop("tensor"), **kwargs)

    projections = {}
    add("token_embd.weight", normal((vocab, hidden), 0.02))
    add("output_norm.weight", 1 + normal((hidden,), 0.1))
    if not tied:
        add("output.weight", normal((vocab, hidden), 0.02))
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    shared = {}
    for layer in range(layers):
        add(f"blk.{layer}.attn_norm.weight", 1 + normal((hidden,), 0.1))
        add(f"blk.{layer}.ffn_norm.weight", 1 + normal((hidden,), 0.1))
        for kind, shape in shapes.items():
            name = f"blk.{layer}.{kind}.weight"
            if not (share_layers and kind in shared):
                projections[name] = normal(shape, 0.5 / np.sqrt(shape[1]))
                shared[kind] = stored(projections[name])
            writer.add_tensor(name, **shared[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return projections


TINY = dict(hidden=128, ffn=256, layers=2, heads=4, kv_heads=2, vocab=96)
PROMPT = [1, 5, 17, 3, 88, 41, 7, 60, 2, 33, 12, 90]


def build(path: Path, factory):
    """A model from a GGUF through the registry's own builder, with `factory` making the Linears.

    Returns (model, config, the opened GGUFFile)."""
    from mistralrs_jax.models.model_config import config_from_gguf
    from mistralrs_jax.loading.gguf import GGUFFile
    from mistralrs_jax.models.registry import build_model
    from mistralrs_jax.loading.gguf_weights import GGUFWeights

    source = GGUFFile(str(path))
    config = config_from_gguf(source.metadata, str(path))
    return build_model(config, GGUFWeights(source, config, factory)), config, source


def logits_of(model, config, tokens=PROMPT) -> np.ndarray:
    from mistralrs_jax.engine.runner import ModelRunner

    runner = ModelRunner(model, config, num_blocks=4, block_size=16, max_model_len=32, max_num_seqs=1,
                         max_num_batched_tokens=16)
    return runner.score(tokens)


@pytest.fixture(scope="module")
def tiny_f32_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("isq") / "tiny-f32.gguf"
    write_llama_gguf(path, **TINY)
    return path


@pytest.mark.parametrize("isq_type", ["Q8_0", "Q4_1"])
def test_isq_model_equals_the_model_of_a_file_gguf_py_quantized(tmp_path, tiny_f32_gguf, isq_type):
    """ISQ of an f32 file == the same weights quantized by gguf-py into a file and loaded as is.

    The lm_head (`output.weight`) stays f32 under ISQ, so the reference file keeps it f32 too.
    """
    from mistralrs_jax.loading.gguf_weights import make_linear_factory

    quantized_file = tmp_path / f"tiny-{isq_type}.gguf"
    write_llama_gguf(quantized_file, **TINY, qtype=isq_type)
    # gguf-py quantized output.weight too; load its reference through the same f32 lm_head.
    isq_factory = wrap_factory(make_linear_factory("f32"), isq_type)
    isq_model, config, _ = build(tiny_f32_gguf, isq_factory)
    ref_factory = wrap_factory(make_linear_factory("quantized"), None)
    build(quantized_file, ref_factory)

    assert isq_factory.summary() == {isq_type: 14, "source": 1}
    for name, linear in isq_factory.linears.items():
        reference = ref_factory.linears[name]
        if name == "output.weight":
            assert not linear.quantized
            continue
        assert linear.quantized and linear.qtype == reference.qtype == isq_type
        # the same bytes as gguf-py's file (rows un-permuted alike for Q/K)
        np.testing.assert_array_equal(np.asarray(linear.blocks[...]), np.asarray(reference.blocks[...]), err_msg=name)

    f32_model, _, _ = build(tiny_f32_gguf, make_linear_factory("f32"))
    exact = logits_of(f32_model, config)
    ours = logits_of(isq_model, config)
    assert np.abs(ours - exact).max() < (0.05 if isq_type == "Q8_0" else 0.3) * np.abs(exact).max()
    assert (ours.argmax(-1) == exact.argmax(-1)).mean() >= 0.75


def test_requantize_in_place_equals_a_fresh_isq_load(tiny_f32_gguf):
    from mistralrs_jax.loading.gguf_weights import make_linear_factory

    factory = wrap_factory(make_linear_factory("f32"), None)
    model, config, _ = build(tiny_f32_gguf, factory)
    f32_logits = logits_of(model, config)
    linear_ids = {name: id(linear) for name, linear in factory.linears.items()}

    assert factory.requantize("Q4K") == {"Q5_0": 12, "Q4_K": 2, "source": 1}  # only ffn_down has 256 columns
    fresh_factory = wrap_factory(make_linear_factory("f32"), "Q4K")
    fresh, _, _ = build(tiny_f32_gguf, fresh_factory)
    assert {name: id(linear) for name, linear in factory.linears.items()} == linear_ids
    ours, theirs = factory.quantized_arrays(), fresh_factory.quantized_arrays()
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name in ours:
        np.testing.assert_array_equal(ours[name]["blocks"], theirs[name]["blocks"], err_msg=name)
    np.testing.assert_array_equal(logits_of(model, config), logits_of(fresh, config))

    factory.requantize(None)
    assert factory.summary() == {"source": 15}
    np.testing.assert_array_equal(logits_of(model, config), f32_logits)


# ---------------------------------------------------------------- the cache


def test_isq_cache_round_trip_stale_key_and_damage(tmp_path, tiny_f32_gguf, caplog):
    from mistralrs_jax.loading.gguf_weights import make_linear_factory

    factory = wrap_factory(make_linear_factory("f32"), "HQQ4")
    model, config, _ = build(tiny_f32_gguf, factory)
    arrays = factory.quantized_arrays()
    key = isq_cache_key(tiny_f32_gguf, "hqq4")
    assert key["isq_type"] == "HQQ4" and key["size"] == tiny_f32_gguf.stat().st_size
    cache_dir = tmp_path / "cache"
    entry = save_isq_cache(cache_dir, key, arrays)
    assert entry is not None

    restored = load_isq_cache(cache_dir, key)
    assert restored.keys() == arrays.keys()
    for name in arrays:
        assert restored[name].keys() == arrays[name].keys()
        for field, value in arrays[name].items():
            assert restored[name][field].dtype == value.dtype
            np.testing.assert_array_equal(restored[name][field], value)

    cached_factory = wrap_factory(make_linear_factory("f32"), "HQQ4", cache=restored)
    cached_model, _, _ = build(tiny_f32_gguf, cached_factory)
    assert cached_factory.cache_hits == 14
    assert cached_factory.summary() == factory.summary() == {"HQQ4": 14, "source": 1}
    np.testing.assert_array_equal(logits_of(cached_model, config), logits_of(model, config))

    assert load_isq_cache(cache_dir, isq_cache_key(tiny_f32_gguf, "Q8_0")) is None  # another type: a miss

    caplog.set_level(logging.WARNING, logger="mistralrs_jax.quant.isq_cache")
    record = json.loads((Path(entry) / "entry.json").read_text())
    record["leaves"][0]["crc32"] ^= 1
    (Path(entry) / "entry.json").write_text(json.dumps(record))
    assert load_isq_cache(cache_dir, key) is None
    assert "damaged" in caplog.text
    (Path(entry) / "entry.json").write_text("{not json")
    assert load_isq_cache(cache_dir, key) is None
    assert save_isq_cache(cache_dir, key, arrays) == entry  # a new save replaces the damaged entry
    assert load_isq_cache(cache_dir, key) is not None

    os.utime(tiny_f32_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file "changed"
    new_key = isq_cache_key(tiny_f32_gguf, "HQQ4")
    assert load_isq_cache(cache_dir, new_key) is None
    # saving for the changed file removes the stale entry of the same file and type
    assert save_isq_cache(cache_dir, new_key, arrays) is not None
    assert not Path(entry).exists() and load_isq_cache(cache_dir, new_key) is not None


# ---------------------------------------------------------------- peak memory of an ISQ load

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import jax, jax.numpy as jnp
    import numpy as np
    from mistralrs_jax.models.model_config import config_from_gguf
    from mistralrs_jax.loading.gguf import GGUFFile
    from mistralrs_jax.loading.gguf_weights import make_linear_factory
    from mistralrs_jax.models.registry import build_model
    from mistralrs_jax.loading.gguf_weights import GGUFWeights
    from mistralrs_jax.quant.isq import wrap_factory

    def rss_anon():
        # Anonymous resident memory: the GGUF's memory-mapped pages are file-backed, not counted.
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    path, isq_type = sys.argv[1], sys.argv[2]
    jnp.zeros(4).block_until_ready()  # start the XLA client before the baseline
    source = GGUFFile(path)
    config = config_from_gguf(source.metadata, path)
    baseline = rss_anon()
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    factory = wrap_factory(make_linear_factory("f32"), isq_type, progress=lambda name, kind: None)
    model = build_model(config, GGUFWeights(source, config, factory))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    from flax import nnx
    model_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
    f32_bytes = {n: int(np.prod(source.tensor(n).shape)) * 4 for n in source.tensor_names}
    largest = max(f32_bytes.values())
    f32_projections = sum(size for n, size in f32_bytes.items() if n.startswith("blk.") and size > 4 * 10**5)
    print(json.dumps({"baseline": baseline, "peak": peak[0], "model_bytes": model_bytes, "largest_f32": largest,
                      "f32_projections": f32_projections, "seconds": seconds, "summary": factory.summary()}))
""")


def test_isq_load_peak_memory_stays_near_the_quantized_size(tmp_path, capsys):
    """Qwen2-0.5B's shapes (hidden 896, ffn 4864, 14/2 heads, 24 layers, tied embeddings; a
    32k vocabulary instead of 152k), F16 on disk, ISQ Q8_0 at load.

    Bound: peak anonymous memory growth <= the finished model + 2 x the largest tensor in
    f32 + 64 MiB (allocator slack, XLA's buffers). Two f32 copies of one tensor: the
    dequantized source and its Q/K-unpermuted (or device) copy."""
    path = tmp_path / "qwen05b-shaped.gguf"
    write_llama_gguf(path, hidden=896, ffn=4864, layers=24, heads=14, kv_heads=2, vocab=32000, qtype="F16",
                     share_layers=True, tied=True)
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), "Q8_0"], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    growth = stats["peak"] - stats["baseline"]
    bound = stats["model_bytes"] + 2 * stats["largest_f32"] + (64 << 20)
    mib = 1 << 20
    with capsys.disabled():
        print(f"\nISQ Q8_0 load of a 0.5B-shaped llama: {stats['seconds']:.1f} s, peak +{growth / mib:.0f} MiB, "
              f"model {stats['model_bytes'] / mib:.0f} MiB, bound {bound / mib:.0f} MiB, "
              f"f32 projections alone {stats['f32_projections'] / mib:.0f} MiB, {stats['summary']}")
    assert stats["summary"] == {"Q8_0": 24 * 7}
    assert bound < stats["f32_projections"]  # the bound excludes holding the f32 projections at all
    assert growth <= bound


# ---------------------------------------------------------------- the real model


def test_smollm2_still_answers_paris_after_isq(smollm2_gguf_path):
    """SmolLM2-135M (Q4_1 on disk) re-quantized with ISQ Q4K, then in place to Q8_0."""
    from mistralrs_jax.loading.tokenizer import Tokenizer
    from mistralrs_jax.loading.gguf_weights import make_linear_factory

    factory = wrap_factory(make_linear_factory("f32"), "Q4K")
    model, config, source = build(Path(smollm2_gguf_path), factory)
    tokenizer = Tokenizer.from_gguf_metadata(source.metadata)
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    # SmolLM2's hidden size is 576 = 2.25 K-blocks: all but ffn_down (1536 columns) fall back.
    assert factory.summary() == {"Q4_K": 30, "Q5_0": 180}
    assert tokenizer.decode([int(logits_of(model, config, prompt)[-1].argmax())]) == " Paris"
    assert factory.requantize("Q8_0") == {"Q8_0": 210}
    assert tokenizer.decode([int(logits_of(model, config, prompt)[-1].argmax())]) == " Paris"
