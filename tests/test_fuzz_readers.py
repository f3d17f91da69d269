"""Corrupted model files from strangers: only typed errors naming the file come out.

The GGUF cases edit the header of the real SmolLM2 file (its 1.8 MB header, followed by a sparse
stretch of zeros as long as the tensor data, so each case costs a header's worth of disk). Each
"found already" case of issue 17 is a test here; a hypothesis run then flips bits and truncates
at every header field, and a child process with a memory cap walks a fixed set of mutations of
every field, so an allocation larger than the file shows up as a failure, not as swapping.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mistralrs_jax.errors import CorruptModelFileError, MistralRsError, ModelLoadError, TemplateError
from mistralrs_jax.loading.gguf import GGUFFile, check_tensor_shapes, read_gguf_metadata
from mistralrs_jax.loading.tokenizer import Tokenizer
from mistralrs_jax.models.model_config import config_from_gguf

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# --------------------------------------------------------------------------- GGUF header fields


def header_fields(data: bytes) -> tuple[list[tuple[str, int, int]], int]:
    """([(label, byte offset, size)] of every header field, end of the tensor records). Written
    from the GGUF spec, apart from the reader under test; arrays list their first two items."""
    fields = [("magic", 0, 4), ("version", 4, 4), ("tensor_count", 8, 8), ("kv_count", 16, 8)]
    tensor_count, kv_count = struct.unpack_from("<QQ", data, 8)
    at = 24

    def string(label: str, at: int) -> int:
        (length,) = struct.unpack_from("<Q", data, at)
        fields.append((label + ".len", at, 8))
        return at + 8 + length

    def value(label: str, kind: int, at: int, listed: bool = True) -> int:
        if kind == 8:
            return string(label, at) if listed else at + 8 + struct.unpack_from("<Q", data, at)[0]
        if kind in _SCALAR_SIZES:
            if listed:
                fields.append((label, at, _SCALAR_SIZES[kind]))
            return at + _SCALAR_SIZES[kind]
        item_kind, count = struct.unpack_from("<IQ", data, at)
        fields.extend([(label + ".item_type", at, 4), (label + ".count", at + 4, 8)])
        at += 12
        if item_kind in _SCALAR_SIZES:
            return at + count * _SCALAR_SIZES[item_kind]
        for index in range(count):
            at = value(f"{label}[{index}]", item_kind, at, listed=index < 2)
        return at

    for _ in range(kv_count):
        key_at = at
        at = string("key", at)
        key = data[key_at + 8:at].decode()
        fields.append((f"{key}.type", at, 4))
        (kind,) = struct.unpack_from("<I", data, at)
        at = value(key, kind, at + 4)
    for index in range(tensor_count):
        at = string(f"tensor{index}.name", at)
        (n_dims,) = struct.unpack_from("<I", data, at)
        fields.append((f"tensor{index}.n_dims", at, 4))
        fields.extend((f"tensor{index}.dim{d}", at + 4 + 8 * d, 8) for d in range(n_dims))
        at += 4 + 8 * n_dims
        fields.extend([(f"tensor{index}.type", at, 4), (f"tensor{index}.offset", at + 4, 8)])
        at += 12
    return fields, at


@pytest.fixture(scope="module")
def smollm2_header(smollm2_gguf_path):
    """(header bytes, file size, {label: (offset, size)}) of the real SmolLM2 GGUF."""
    size = os.path.getsize(smollm2_gguf_path)
    with open(smollm2_gguf_path, "rb") as handle:
        head = handle.read(4 << 20)
    fields, end = header_fields(head)
    return head[:end + 64], size, {label: (offset, width) for label, offset, width in fields}


def write_variant(path, header: bytes, size: int) -> str:
    """The header, then zeros up to `size` (sparse): what a reader checks is all in the header."""
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(max(size, len(header)) if size else len(header))
    return str(path)


def set_field(header: bytes, fields: dict, label: str, value, code: str | None = None) -> bytes:
    offset, width = fields[label]
    code = code or {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
    return header[:offset] + struct.pack(code, value) + header[offset + width:]


def load_like_the_server(path: str, tokenizer: bool = False) -> None:
    """What loading reads of a GGUF before building weights: the file, the hyperparameters, the
    tensor shapes against them and (optionally) the tokenizer and the chat template's syntax."""
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf.metadata, path)
    check_tensor_shapes(gguf, config)
    if tokenizer:
        from mistralrs_jax.loading.chat_template import ChatTemplate

        ChatTemplate.for_tokenizer(Tokenizer.from_gguf_metadata(gguf.metadata, source=path))


def expect_named_error(path: str, error=ModelLoadError, match: str = "", **kwargs) -> str:
    with pytest.raises(error, match=match) as caught:
        load_like_the_server(path, **kwargs)
    assert path in str(caught.value), caught.value
    return str(caught.value)


# --------------------------------------------------------------------------- found already: GGUF

@pytest.mark.parametrize("label, value, code, match", [
    ("tensor0.n_dims", 0xFFFFFFFF, None, "dimensions"),
    ("llama.block_count", 2**32 - 1, None, "num_layers"),
    ("llama.rope.dimension_count", 2**31, None, "rotary width"),
    ("llama.attention.head_count", 0, None, "num_heads"),
    ("llama.attention.head_count_kv", 0, None, "num_kv_heads"),
    ("llama.block_count", 0, None, "num_layers"),
    ("llama.embedding_length", 0, None, "hidden_size"),
    ("llama.context_length", 0, None, "max_position_embeddings"),
    ("llama.attention.layer_norm_rms_epsilon", math.nan, "<f", "rms_norm_eps"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "<f", "rms_norm_eps"),
    ("llama.rope.freq_base", 0.0, "<f", "rope_theta"),
    ("llama.rope.freq_base", math.nan, "<f", "rope_theta"),
    ("llama.block_count", 1, None, "says 1 blocks"),
    ("llama.embedding_length", 1152, None, "token_embd.weight"),  # tensor shapes against hyperparameters
    ("llama.feed_forward_length", 1024, None, "ffn_"),
    ("llama.vocab_size", 49153, None, "49152 tokens"),  # vocab size vs token count vs embedding rows
    ("version", 4, None, "version 4"),
    ("version", 0xFFFFFFFF, None, "version 4294967295"),
    ("tensor0.offset", 1, None, "alignment"),  # misaligned
    ("tensor1.offset", 0, None, "overlaps"),
    ("tensor1.offset", 2**40, None, "gap|ends at byte"),  # past the end
    ("tensor1.type", 8, None, "overlaps|gap"),  # F32 -> Q8_0: the type id does not match the data size
    # Dims of 0 or a wrong size. Where the tensor's data shrinks, the next tensor's offset no longer
    # follows it; the last tensor (output_norm.weight) and a small change meet the shape check.
    ("tensor0.dim0", 0, None, "gap after tensor 'token_embd.weight'"),
    ("tensor0.dim1", 49151, None, "gap after tensor 'token_embd.weight'"),  # one embedding row short
    ("tensor1.dim0", 0, None, "gap after tensor 'blk.0.attn_norm.weight'"),
    ("tensor1.dim0", 575, None, r"'blk.0.attn_norm.weight' has shape \[575\], but the hyperparameters call for"),
    ("tensor271.dim0", 0, None, r"'output_norm.weight' has shape \[0\], but the hyperparameters call for"),
])
def test_corrupt_header_field_is_refused_naming_the_file(tmp_path, smollm2_header, label, value, code, match):
    header, size, fields = smollm2_header
    path = write_variant(tmp_path / "corrupt.gguf", set_field(header, fields, label, value, code), size)
    expect_named_error(path, match=match)


@pytest.mark.parametrize("alignment, match", [(0, "power of two"), (3, "power of two"), (1024, "alignment 1024"),
                                              (128, "ends at byte")])
def test_bad_general_alignment_is_refused(tmp_path, smollm2_header, alignment, match):
    # "general.file_type" (u32) and "general.alignment" have names of the same length: rename it in place.
    header, size, fields = smollm2_header
    key_at = fields["general.file_type.type"][0] - len("general.file_type")
    header = header[:key_at] + b"general.alignment" + header[key_at + len("general.file_type"):]
    fields = {**fields, "general.alignment": fields["general.file_type"]}
    path = write_variant(tmp_path / "aligned.gguf", set_field(header, fields, "general.alignment", alignment), size)
    expect_named_error(path, match=match)


def _gguf_with_one_array(payload: bytes) -> bytes:
    """A GGUF v3 header with no tensors and one key "x" holding `payload` (an array value)."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9) + payload


def test_deeply_nested_and_huge_nested_arrays_are_refused_at_once(tmp_path):
    deep = b"".join(struct.pack("<IQ", 9, 1) for _ in range(100_000)) + struct.pack("<IQ", 4, 0)
    many_empty = struct.pack("<IQ", 9, 4_000_000) + struct.pack("<IQ", 4, 0) * 4_000_000
    for name, payload in (("deep", deep), ("many", many_empty)):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(_gguf_with_one_array(payload))
        start = time.monotonic()
        with pytest.raises(CorruptModelFileError, match=f"{name}.gguf.*arrays") as caught:
            read_gguf_metadata(str(path))
        assert "nested" in str(caught.value)
        assert time.monotonic() - start < 5, f"{name}: refused only after {time.monotonic() - start:.1f} s"


def test_counts_past_the_file_are_refused_before_allocating(tmp_path):
    for payload in (struct.pack("<IQ", 4, 2**62), struct.pack("<IQ", 8, 2**40)):
        path = tmp_path / "counts.gguf"
        path.write_bytes(_gguf_with_one_array(payload))
        with pytest.raises(CorruptModelFileError, match="counts.gguf.*claims"):
            read_gguf_metadata(str(path))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60))
    with pytest.raises(CorruptModelFileError, match="counts.gguf.*more than"):
        read_gguf_metadata(str(path))


# --------------------------------------------------------------------------- found already: tokenizer


def test_broken_vocabulary_raises_a_typed_error_naming_the_file(smollm2_gguf_path):
    meta = read_gguf_metadata(smollm2_gguf_path)
    broken = [
        {**meta, "tokenizer.ggml.merges": ["Ġ t", "no-space-here"]},  # a merge without two parts
        {**meta, "tokenizer.ggml.merges": ["zz@@ qq##"]},  # a merge of pieces not in the vocabulary
        {**meta, "tokenizer.ggml.token_type": [1]},  # fewer types than tokens
        {**meta, "tokenizer.ggml.pre": "no-such-pre"},
    ]
    for fields in broken:
        with pytest.raises(ModelLoadError) as caught:
            Tokenizer.from_gguf_metadata(fields, source=smollm2_gguf_path)
        assert smollm2_gguf_path in str(caught.value)


def test_the_loader_names_the_file_in_tokenizer_errors(tmp_path, smollm2_header):
    """`LLM` (through load_model) builds the tokenizer with the file's name, not `<gguf metadata>`."""
    from mistralrs_jax.loading.model_loader import ModelSpec, load_model

    header, size, fields = smollm2_header
    offset, _ = fields["tokenizer.ggml.merges[0].len"]
    (length,) = struct.unpack_from("<Q", header, offset)
    merge_at = offset + 8
    header = header[:merge_at] + b"\x01" * length + header[merge_at + length:]  # no space in the first merge
    path = write_variant(tmp_path / "badmerge.gguf", header, size)
    with pytest.raises(CorruptModelFileError, match="badmerge.gguf.*merge"):
        load_model(ModelSpec(model=path))


# --------------------------------------------------------------------------- found already: GGML


def _ggjt(n_vocab=4, n_embd=64, n_mult=1, n_head=4, n_layer=1, n_rot=16, ftype=0) -> bytes:
    vocab = b"".join(struct.pack("<I", 1) + bytes([65 + i]) + struct.pack("<f", 0.0) for i in range(n_vocab))
    return b"tjgg" + struct.pack("<I7i", 3, n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype) + vocab


@pytest.mark.parametrize("changes, match", [
    ({"n_embd": 0}, "n_embd = 0"), ({"n_layer": 2**31 - 1}, "n_layer"), ({"n_embd": -64}, "n_embd = -64"),
    ({"n_layer": -2**31}, "n_layer = -2147483648"),  # the bytes of 2^31 (0x80000000), as the i32 the format holds
    ({"n_head": 0}, "n_head = 0"), ({"n_embd": 64, "n_head": 5}, "multiple"),
])
def test_ggml_hyperparameters_are_checked_before_use(tmp_path, changes, match):
    from mistralrs_jax.loading.ggml import GGMLFile

    path = tmp_path / "legacy.bin"
    path.write_bytes(_ggjt(**changes))
    with pytest.raises(CorruptModelFileError, match=match) as caught:
        GGMLFile(str(path))
    assert str(path) in str(caught.value)


def _ggjt_with_tensors() -> bytes:
    """A small valid ggjt v3 file: the header above, then three F32 tensors a LLaMA file needs."""
    data = bytearray(_ggjt(n_layer=1))
    rng = np.random.default_rng(0)
    for name, rows in (("tok_embeddings.weight", 4), ("layers.0.attention.wk.weight", 64),
                       ("layers.0.feed_forward.w1.weight", 128)):
        encoded = name.encode()
        data += struct.pack("<3i", 2, len(encoded), 0) + struct.pack("<2i", 64, rows) + encoded
        data += b"\0" * (-len(data) % 32)
        data += rng.standard_normal((rows, 64)).astype(np.float32).tobytes()
    return bytes(data)


def test_fuzzed_ggml_files_give_typed_errors_naming_the_file(tmp_path):
    from mistralrs_jax.loading.ggml import GGMLFile

    raw = _ggjt_with_tensors()
    path = tmp_path / "fuzzed.bin"
    path.write_bytes(raw)
    GGMLFile(str(path))  # the unmutated file loads
    header_bytes = len(raw) - 196 * 64 * 4  # the tensor data are not worth flipping
    counts = {"loaded": 0, "refused": 0}

    @settings(max_examples=200, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(min_value=0, max_value=header_bytes * 8 - 1), st.sampled_from(["flip", "cut", "max"]))
    def case(position, how):
        at = position // 8
        if how == "cut":
            data = raw[:at]
        else:
            byte = raw[at] ^ (1 << position % 8) if how == "flip" else 0xFF
            data = raw[:at] + bytes([byte]) + raw[at + 1:]
        path.write_bytes(data)
        try:
            gguf = GGMLFile(str(path))
            check_tensor_shapes(gguf, config_from_gguf(gguf.metadata, str(path)))
            counts["loaded"] += 1
        except MistralRsError as exc:
            assert str(path) in str(exc), exc
            counts["refused"] += 1

    case()
    print(f"GGML fuzz: 200 cases, {counts}")
    assert counts["refused"] > 0


# --------------------------------------------------------------------------- fuzzing GGUF


def _mutations():
    """(field index, how, bit or cut) for hypothesis: flip a bit, zero, saturate, or truncate."""
    return st.tuples(st.integers(min_value=0), st.sampled_from(["flip", "zero", "max", "cut"]),
                     st.integers(min_value=0, max_value=63))


def mutate(header: bytes, size: int, field: tuple[str, int, int], how: str, bit: int) -> tuple[bytes, int]:
    label, offset, width = field
    if how == "cut":
        cut = offset + bit % (width + 1)
        return header[:cut], 0  # a file that ends inside (or right after) the field
    old = int.from_bytes(header[offset:offset + width], "little")
    new = {"flip": old ^ (1 << (bit % (8 * width))), "zero": 0, "max": (1 << 8 * width) - 1}[how]
    return header[:offset] + new.to_bytes(width, "little") + header[offset + width:], size


@pytest.fixture(scope="module")
def field_list(smollm2_header):
    _, _, fields = smollm2_header
    return [(label, offset, width) for label, (offset, width) in fields.items()]


FUZZ_CASES = 300


@pytest.mark.slow
def test_fuzzed_gguf_headers_give_typed_errors_naming_the_file(tmp_path_factory, smollm2_header, field_list):
    header, size, _ = smollm2_header
    directory = tmp_path_factory.mktemp("fuzz")
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=FUZZ_CASES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_mutations())
    def case(mutation):
        index, how, bit = mutation
        field = field_list[index % len(field_list)]
        data, length = mutate(header, size, field, how, bit)
        path = write_variant(directory / "fuzzed.gguf", data, length)
        try:
            load_like_the_server(path, tokenizer=field[0].startswith("tokenizer."))
            outcomes["loaded"] += 1
        except MistralRsError as exc:
            assert path in str(exc), f"{field} {how} {bit}: {exc}"
            outcomes["refused"] += 1

    case()
    print(f"GGUF fuzz: {FUZZ_CASES} cases, {outcomes}")
    assert outcomes["refused"] > FUZZ_CASES // 4


CHILD = textwrap.dedent("""
    import gc, json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from test_fuzz_readers import header_fields, load_like_the_server, mutate, write_variant
    from mistralrs_jax.errors import MistralRsError
    source, workdir, limit = sys.argv[2], sys.argv[3], int(sys.argv[4])
    import os
    size = os.path.getsize(source)
    header = open(source, "rb").read(4 << 20)
    fields, end = header_fields(header)
    header = header[:end + 64]
    # Everything below may allocate at most `limit` bytes of address space beyond what is mapped now.
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + limit, vm + limit))
    report = {"cases": 0, "refused": 0, "loaded": 0, "other": [], "slowest_s": 0.0}
    # Every metadata field (bar the vocabulary's items) and every field of three tensor records.
    picked = [f for f in fields if "[" not in f[0] and not f[0].startswith("tensor")
              or f[0].split(".")[0] in ("tensor0", "tensor1", "tensor271") or f[0].endswith("[0].len")]
    for field in picked:
        for how, bit in (("flip", 7), ("flip", 31), ("flip", 63), ("zero", 0), ("max", 0), ("cut", 1)):
            data, length = mutate(header, size, field, how, bit)
            path = write_variant(os.path.join(workdir, "child.gguf"), data, length)
            start = time.monotonic()
            try:
                load_like_the_server(path)
                report["loaded"] += 1
            except MistralRsError as exc:
                report["refused"] += 1
                if path not in str(exc):
                    report["other"].append([field[0], how, "unnamed: " + str(exc)[:200]])
            except BaseException as exc:
                report["other"].append([field[0], how, type(exc).__name__ + ": " + str(exc)[:200]])
            report["cases"] += 1
            if report["cases"] % 50 == 0:
                gc.collect()
            report["slowest_s"] = max(report["slowest_s"], time.monotonic() - start)
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_every_header_field_mutated_in_a_memory_capped_child(tmp_path, smollm2_gguf_path):
    """Each header field (bar the vocabulary's 100k strings) zeroed, saturated, bit-flipped and cut,
    in a child whose address space may grow by at most 1 GiB (the file is 94 MB): an allocation
    sized from a corrupt count fails the test instead of being attempted."""
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", CHILD, tests_dir, smollm2_gguf_path, str(tmp_path), str(1 << 30)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"GGUF child fuzz: {report['cases']} cases, {report['refused']} refused, {report['loaded']} loaded, "
          f"slowest {report['slowest_s']:.2f} s")
    assert report["other"] == []
    assert report["cases"] > 400


# --------------------------------------------------------------------------- safetensors


@pytest.fixture()
def small_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "small.safetensors"
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64),
               "c": np.ones((2, 2), dtype=np.float16)}, str(path))
    return path


def _with_header(path, header_text: str, length_delta: int = 0, data: bytes | None = None) -> str:
    raw = path.read_bytes()
    (old_len,) = struct.unpack_from("<Q", raw, 0)
    body = raw[8 + old_len:] if data is None else data
    encoded = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(encoded) + length_delta) + encoded + body)
    return str(path)


def _header(path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8:8 + length])


@pytest.mark.parametrize("edit", [
    "not an object", "deep nesting", "missing dtype", "ill-typed dtype", "missing shape", "ill-typed shape",
    "missing offsets", "ill-typed offsets", "negative offsets", "offsets out of file", "overlap",
    "size not matching", "entry not an object", "length +1", "length -1", "truncated",
])
def test_corrupt_safetensors_header_is_refused_naming_the_file(small_safetensors, edit):
    from mistralrs_jax.loading.safetensors import SafetensorsFile

    header = _header(small_safetensors)
    a = header["a"]
    edits = {
        "not an object": lambda h: [1, 2, 3],
        "deep nesting": lambda h: None,
        "missing dtype": lambda h: {**h, "a": {k: v for k, v in a.items() if k != "dtype"}},
        "ill-typed dtype": lambda h: {**h, "a": {**a, "dtype": ["F32"]}},
        "missing shape": lambda h: {**h, "a": {k: v for k, v in a.items() if k != "shape"}},
        "ill-typed shape": lambda h: {**h, "a": {**a, "shape": "3x4"}},
        "missing offsets": lambda h: {**h, "a": {k: v for k, v in a.items() if k != "data_offsets"}},
        "ill-typed offsets": lambda h: {**h, "a": {**a, "data_offsets": [0.5, 48]}},
        "negative offsets": lambda h: {**h, "a": {**a, "data_offsets": [-128, 0], "shape": [32]}},
        "offsets out of file": lambda h: {**h, "a": {**a, "data_offsets": [10**6, 10**6 + 48]}},
        "overlap": lambda h: {**h, "c": {**h["c"], "data_offsets": [0, 8]}},
        "size not matching": lambda h: {**h, "a": {**a, "shape": [4, 4]}},
        "entry not an object": lambda h: {**h, "a": 7},
    }
    path = str(small_safetensors)
    if edit == "deep nesting":
        _with_header(small_safetensors, "[" * 100_000 + "]" * 100_000)
    elif edit in ("length +1", "length -1"):
        _with_header(small_safetensors, json.dumps(header), length_delta=1 if edit == "length +1" else -1)
    elif edit == "truncated":
        raw = small_safetensors.read_bytes()
        small_safetensors.write_bytes(raw[:-1])
    else:
        _with_header(small_safetensors, json.dumps(edits[edit](dict(header))))
    with pytest.raises(ModelLoadError) as caught:
        SafetensorsFile(path)
    assert path in str(caught.value)


def test_fuzzed_safetensors_match_the_safetensors_library(tmp_path):
    """Bit flips and truncations of a small file: ours refuses with a typed error naming the file,
    or reads exactly what the safetensors library reads (which must then accept the file too)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from mistralrs_jax.loading.safetensors import SafetensorsFile

    original = tmp_path / "orig.safetensors"
    save_file({"w": np.arange(24, dtype=np.float32).reshape(4, 6), "i": np.arange(3, dtype=np.int32)}, str(original))
    raw = original.read_bytes()
    path = tmp_path / "fuzz.safetensors"
    counts = {"read": 0, "refused": 0}

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(min_value=0, max_value=len(raw) * 8 - 1), st.booleans())
    def case(position, truncate):
        data = raw[:position // 8] if truncate else (
            raw[:position // 8] + bytes([raw[position // 8] ^ (1 << position % 8)]) + raw[position // 8 + 1:])
        path.write_bytes(data)
        try:
            ours = SafetensorsFile(str(path))
            tensors = {name: np.array(ours.tensor(name)) for name in ours.keys()}
        except MistralRsError as exc:
            assert str(path) in str(exc)
            counts["refused"] += 1
            return
        with safe_open(str(path), "np") as reference:
            assert sorted(reference.keys()) == sorted(tensors)
            for name in tensors:
                np.testing.assert_array_equal(reference.get_tensor(name), tensors[name])
        counts["read"] += 1

    case()
    print(f"safetensors fuzz: 300 cases, {counts}")
    assert counts["refused"] > 0


# --------------------------------------------------------------------------- chat template in the file


def test_runaway_template_in_a_gguf_fails_closed_at_render_not_at_load(tmp_path, smollm2_header):
    """`{{ 9**(9**9) }}` as the file's chat template: loading stays instant (no constant folding),
    rendering gives a TemplateError."""
    from mistralrs_jax.loading.chat_template import ChatTemplate

    header, size, fields = smollm2_header
    offset, _ = fields["tokenizer.chat_template.len"]
    (length,) = struct.unpack_from("<Q", header, offset)
    bomb = b"{{ 9**(9**9) }}"
    body = bomb + b" " * (length - len(bomb))
    path = write_variant(tmp_path / "bomb.gguf", header[:offset + 8] + body + header[offset + 8 + length:], size)
    start = time.monotonic()
    tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(path), source=path)
    template = ChatTemplate.for_tokenizer(tokenizer)
    assert time.monotonic() - start < 30
    with pytest.raises(TemplateError, match="too large"):
        template.render([{"role": "user", "content": "hi"}])
