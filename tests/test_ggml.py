"""Legacy GGML files (ggml, ggmf v1, ggjt v1-v3): read as llama.cpp reads them, run as transformers does.

A tiny LLaMA checkpoint (transformers) becomes GGUF through llama.cpp's converter and then
legacy files of every container version and weight type (tests/ggml_fixtures.py). References:
- llama.cpp's own GGML reader (`convert_llama_ggml_to_gguf.py`): the tensors (type, shape,
  bytes) and the vocabulary (pieces, scores, types) the engine reads must be what it reads;
- transformers: logits and greedy tokens of the checkpoint (f32 file), or of llama.cpp's GGUF
  conversion of the quantized file (transformers dequantizes it with gguf-py);
- sentencepiece: the vocabulary rebuilt from the file tokenizes like the original model.
"""
from __future__ import annotations

import shlex
import struct

import numpy as np
import pytest

from ggml_fixtures import CONFIG, build_llama_checkpoint, convert_to_gguf, llama_cpp_convert_ggml, write_ggml
from family_fixtures import DATA_DIR, ReferenceUnavailable, load_reference, reference_greedy, reference_logits
from peers import missing_peer, require_peer, transformers_logits

from mistralrs_jax import LLM, SamplingParams, cli
from mistralrs_jax.errors import CorruptModelFileError, ModelLoadError, NotSupportedError
from mistralrs_jax.loading.ggml import GGMLFile
from mistralrs_jax.loading.tokenizer import Tokenizer

GQA = CONFIG["num_attention_heads"] // CONFIG["num_key_value_heads"]
# (container, version, weight type, extra per-tensor types): every container; every type a
# ggjt v3 file held (v3 is when Q4_0/Q4_1/Q8_0 took today's layout; K-quants came after).
VARIANTS = {
    "ggjt3-F32": ("ggjt", 3, "F32", None),
    "ggjt3-F16": ("ggjt", 3, "F16", None),
    "ggjt3-Q4_0": ("ggjt", 3, "Q4_0", None),
    "ggjt3-Q4_1": ("ggjt", 3, "Q4_1", None),
    "ggjt3-Q5_1": ("ggjt", 3, "Q5_1", None),
    "ggjt3-Q8_0": ("ggjt", 3, "Q8_0", None),
    # q4_K_M-like: Q4_K with a Q6_K head and V projections.
    "ggjt3-Q4_K_M": ("ggjt", 3, "Q4_K", {"output.weight": "Q6_K", "blk.0.attn_v.weight": "Q6_K",
                                          "blk.1.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q5_K"}),
    "ggjt2-Q5_0": ("ggjt", 2, "Q5_0", None),
    "ggjt1-F16": ("ggjt", 1, "F16", None),
    "ggmf1-F32": ("ggmf", 1, "F32", None),
    "ggml-F16": ("ggml", 0, "F16", None),
}
# As in test_families.py: one sequence, prompts up to 128 tokens, two step shapes compiled on demand.
# cpu_weights="f32": these tests hold the conversion to transformers' numbers (1e-4); the CPU
# kernel's 8-bit activations are checked against f32 in test_packed_engine.py.
LLM_KWARGS = dict(warmup=False, max_seqs=1, max_num_batched_tokens=128, token_buckets=[2, 128], pa_ctxt_len=256,
                  prefix_cache_n=0, cpu_weights="f32")
MAX_ABS_DIFF = 1e-4  # f32 summation order (test_families.py measured <= 6.2e-6)
# A LoRA delta merged into the GGML weights moves logits by ~5-16, and its f32 rounding with them:
# measured 8.4e-5 against PEFT, so this bound leaves 6x (an epsilon or RoPE error moves them by > 0.4).
LORA_MAX_ABS_DIFF = 5e-4
SCORE_LEN = 80


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """{"checkpoint": dir, "gguf": the f32 GGUF, variant: legacy file} (legacy files in a directory
    without config.json, so the file's own defaults apply)."""
    require_peer("torch")
    require_peer("transformers")
    require_peer("sentencepiece")
    require_peer("gguf")
    root = tmp_path_factory.mktemp("ggml")
    checkpoint = build_llama_checkpoint(root / "checkpoint")
    gguf_path = root / "model.gguf"
    try:
        convert_to_gguf([(checkpoint, gguf_path)])
    except ReferenceUnavailable as exc:
        missing_peer(f"llama.cpp's converter is unavailable (the llama-cpp-python sdist could not be fetched): {exc}")
    files = root / "files"
    files.mkdir()
    found = {"checkpoint": checkpoint, "gguf": gguf_path}
    for name, (container, version, weight_type, types) in VARIANTS.items():
        found[name] = write_ggml(gguf_path, files / f"model.{name}.bin", container=container, version=version,
                                 weight_type=weight_type, types=types)
    return found


@pytest.fixture(scope="module")
def llama_cpp_reading(models, tmp_path_factory) -> dict:
    """{variant: the GGUF llama.cpp's converter makes of it}."""
    root = tmp_path_factory.mktemp("ggml-to-gguf")
    return {name: llama_cpp_convert_ggml(models[name], root / f"{name}.gguf", "--gqa", str(GQA), "--eps",
                                         str(CONFIG["rms_norm_eps"]))
            for name in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reader_matches_llama_cpp(variant, models, llama_cpp_reading):
    import gguf

    ours = GGMLFile(models[variant])
    theirs = gguf.GGUFReader(llama_cpp_reading[variant])
    assert sorted(ours.tensor_names) == sorted(t.name for t in theirs.tensors)
    for tensor in theirs.tensors:
        mine = ours.tensor(tensor.name)
        assert mine.qtype == tensor.tensor_type.name, tensor.name
        assert mine.shape == tuple(reversed([int(d) for d in tensor.shape])), tensor.name
        assert np.array_equal(mine.data, np.asarray(tensor.data).reshape(-1).view(np.uint8)), tensor.name

    fields = theirs.fields
    assert ours.metadata["tokenizer.ggml.tokens"] == fields["tokenizer.ggml.tokens"].contents()
    assert np.array_equal(ours.metadata["tokenizer.ggml.scores"], fields["tokenizer.ggml.scores"].contents())
    assert ours.metadata["tokenizer.ggml.token_type"] == fields["tokenizer.ggml.token_type"].contents()
    for key in ("embedding_length", "block_count", "feed_forward_length", "rope.dimension_count",
                "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon"):
        assert ours.metadata[f"llama.{key}"] == pytest.approx(fields[f"llama.{key}"].contents()), key


def test_embedded_vocabulary_tokenizes_like_sentencepiece(models):
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(models["checkpoint"] / "tokenizer.model"))
    tokenizer = Tokenizer.from_gguf_metadata(GGMLFile(models["ggjt3-Q4_0"]).metadata)
    text = (DATA_DIR / "english.txt").read_text(encoding="utf-8")[:600]
    for sample in ("The quick brown fox jumps over the lazy dog.", "  leading spaces and\nnew lines",
                   "naïve café — 東京 😀", text):
        assert tokenizer.encode(sample) == [1] + reference.encode(sample), sample
        assert tokenizer.decode(tokenizer.encode(sample)) == reference.decode(reference.encode(sample))


def _token_ids(count: int, seed: int) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, CONFIG["vocab_size"], size=count - 1).tolist()


@pytest.fixture(scope="module")
def f32_llm(models):
    """The f32 ggjt v3 file, loaded the way `mistralrs-server ggml -m DIR -f FILE` loads it."""
    command = f"ggml -m {models['ggjt3-F32'].parent} -f {models['ggjt3-F32'].name}"
    kwargs = cli.build_llm_kwargs(cli.build_parser().parse_args(shlex.split(command)))
    assert kwargs["gqa"] is None and kwargs["gguf_file"] == models["ggjt3-F32"].name
    llm = LLM(**{**kwargs, **LLM_KWARGS})
    yield llm
    llm.shutdown()


def test_f32_file_matches_transformers_on_the_checkpoint(models, f32_llm):
    reference = load_reference(models["checkpoint"])
    ids = _token_ids(SCORE_LEN, seed=1)
    diff = np.abs(f32_llm.score(ids) - reference_logits(reference, ids))
    assert diff.max() < MAX_ABS_DIFF, diff.max()
    prompt = _token_ids(24, seed=2)
    ours = f32_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert ours.outputs[0].token_ids == reference_greedy(reference, prompt, 24)
    assert f32_llm.model_name == "model.ggjt3-F32"


@pytest.mark.parametrize("variant", ["ggjt3-Q4_K_M", "ggjt3-Q5_1", "ggml-F16"])
def test_quantized_files_match_transformers_on_llama_cpps_conversion(variant, models, llama_cpp_reading):
    llm = LLM(model=str(models[variant]), gqa=GQA, **LLM_KWARGS)
    try:
        ids = _token_ids(SCORE_LEN, seed=3)
        diff = np.abs(llm.score(ids) - transformers_logits(llama_cpp_reading[variant], ids))
        assert diff.max() < MAX_ABS_DIFF, diff.max()
    finally:
        llm.shutdown()


def test_config_json_beside_the_file_supplies_eps_and_rope_base(tmp_path):
    """A legacy file has no eps / RoPE base: a config.json beside it (or the tokenizer) gives them."""
    checkpoint = build_llama_checkpoint(tmp_path / "checkpoint", seed=4, rope_theta=50000.0, rms_norm_eps=1e-6)
    convert_to_gguf([(checkpoint, tmp_path / "model.gguf")])
    inside = write_ggml(tmp_path / "model.gguf", checkpoint / "model.ggmlv3.f32.bin")
    alone = write_ggml(tmp_path / "model.gguf", tmp_path / "model.ggmlv3.f32.bin")
    defaults = GGMLFile(alone).metadata
    assert defaults["llama.rope.freq_base"] == 10000.0 and defaults["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    llm = LLM(model=str(inside), **LLM_KWARGS)
    try:
        assert llm.model_config.rope_theta == 50000.0 and llm.model_config.rms_norm_eps == 1e-6
        ids = _token_ids(SCORE_LEN, seed=5)
        diff = np.abs(llm.score(ids) - reference_logits(load_reference(checkpoint), ids))
        assert diff.max() < MAX_ABS_DIFF, diff.max()
    finally:
        llm.shutdown()


def test_lora_adapter_on_a_ggml_file_matches_peft(models, tmp_path):
    """`lora-ggml -m DIR -f FILE -a ADAPTER`: a PEFT adapter on Q, K (whose rows the file keeps
    permuted for RoPE) and down_proj, merged into the f32 legacy file, against transformers + PEFT."""
    peft = require_peer("peft")
    import torch

    model = peft.get_peft_model(load_reference(models["checkpoint"]),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: an adapter that changes nothing proves nothing
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    model.save_pretrained(tmp_path / "adapter")
    ids = _token_ids(SCORE_LEN, seed=7)
    expected, base = reference_logits(model, ids), reference_logits(load_reference(models["checkpoint"]), ids)

    command = f"lora-ggml -m {models['ggjt3-F32'].parent} -f {models['ggjt3-F32'].name} -a {tmp_path / 'adapter'}"
    kwargs = cli.build_llm_kwargs(cli.build_parser().parse_args(shlex.split(command)))
    with LLM(**{**kwargs, **LLM_KWARGS}) as llm:
        logits = llm.score(ids)
    assert np.abs(expected - base).max() > 1.0  # the adapter matters
    assert np.abs(logits - expected).max() < LORA_MAX_ABS_DIFF


# --------------------------------------------------------------------------- bad files


def test_gqa_that_contradicts_the_tensors_names_the_right_one(models):
    with pytest.raises(ModelLoadError, match=rf"--gqa 1 means 4 KV heads, but the K projection holds 2 \(use --gqa {GQA}"):
        GGMLFile(models["ggjt3-Q4_0"], gqa=1)
    assert GGMLFile(models["ggjt3-Q4_0"], gqa=GQA).metadata["llama.attention.head_count_kv"] == 2


@pytest.mark.parametrize("container, version, weight_type", [("ggjt", 1, "Q4_0"), ("ggjt", 2, "Q8_0"),
                                                             ("ggmf", 1, "Q5_1"), ("ggml", 0, "Q4_1")])
def test_pre_v3_quantized_layouts_are_refused(container, version, weight_type, models, tmp_path):
    path = write_ggml(models["gguf"], tmp_path / "old.bin", container=container, version=version,
                      weight_type=weight_type)
    with pytest.raises(NotSupportedError, match=rf"{path}: tensor '.*' is {weight_type} in a {container} "
                                                rf"v{version} file.*predates ggjt v3"):
        GGMLFile(path)


def test_truncated_file_names_the_file_and_the_tensor(models, tmp_path):
    data = models["ggjt3-Q8_0"].read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptModelFileError, match=rf"{truncated}: tensor '.*' ends at byte \d+ but the file has "
                                                    rf"only {len(data) - 1000} bytes"):
        GGMLFile(truncated)
    cut_in_header = tmp_path / "header.bin"
    cut_in_header.write_bytes(data[:200])
    with pytest.raises(CorruptModelFileError, match=rf"{cut_in_header}: cannot parse the ggjt file"):
        LLM(model=str(cut_in_header), **LLM_KWARGS)


def test_unknown_version_and_foreign_tensors_are_refused(models, tmp_path):
    data = bytearray(models["ggjt3-F16"].read_bytes())
    struct.pack_into("<I", data, 4, 4)
    future = tmp_path / "v4.bin"
    future.write_bytes(bytes(data))
    with pytest.raises(CorruptModelFileError, match="ggjt version 4 is unknown"):
        GGMLFile(future)
    renamed = bytes(models["ggjt3-F16"].read_bytes()).replace(b"feed_forward.w1", b"feed_forward.w9", 1)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(renamed)
    with pytest.raises(ModelLoadError, match=r"tensor 'layers\.\d+\.feed_forward\.w9\.weight' is not part of a LLaMA"):
        GGMLFile(foreign)
