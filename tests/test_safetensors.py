"""Hugging Face checkpoint directories: single and sharded safetensors, dtypes, memory, and the errors a
user meets with a broken or foreign checkpoint. References are transformers and sentencepiece."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import build_checkpoint, load_reference, reference_logits
from peers import require_peer

SCORE_IDS = np.random.default_rng(5).integers(3, 128, size=40).tolist()
MAX_ABS_DIFF = 1e-4  # f32 against f32: measured <= 6.2e-6 (see test_families.py)
LLM_KWARGS = dict(warmup=False, max_seqs=1, max_num_batched_tokens=64, token_buckets=[2, 64], pa_ctxt_len=256,
                  prefix_cache_n=0)


@pytest.fixture(scope="module")
def peers():
    require_peer("torch")
    require_peer("transformers")
    require_peer("sentencepiece")


@pytest.fixture(scope="module")
def llama_dir(peers, tmp_path_factory) -> Path:
    directory = build_checkpoint("llama3", tmp_path_factory.mktemp("st") / "llama3")
    generation = json.loads((directory / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 7]  # a second end-of-sequence id only generation_config.json names
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def _score(path, **kwargs) -> np.ndarray:
    from mistralrs_jax import LLM

    with LLM(model=str(path), **{**LLM_KWARGS, **kwargs}) as llm:
        return llm.score(SCORE_IDS)


def test_directory_loads_with_its_tokenizer_and_generation_config(llama_dir):
    import sentencepiece as spm

    from mistralrs_jax import LLM

    text = "The river was quiet, and the town slept beside it."
    with LLM(model=str(llama_dir), **LLM_KWARGS) as llm:
        assert llm.model_config.arch == "llama"
        assert 7 in llm.model_config.eos_token_ids and 2 in llm.model_config.eos_token_ids
        processor = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
        assert llm.tokenizer.encode(text, add_special_tokens=False) == processor.encode(text)
        logits = llm.score(SCORE_IDS)
    expected = reference_logits(load_reference(llama_dir), SCORE_IDS)
    assert np.abs(logits - expected).max() <= MAX_ABS_DIFF


def test_generation_config_defaults(tmp_path):
    """generation_config.json's sampling, in the names SamplingParams takes (and accepts)."""
    from mistralrs_jax import SamplingParams
    from mistralrs_jax.loading.safetensors import generation_defaults

    assert generation_defaults(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 99, "eos_token_id": 2}))
    defaults = generation_defaults(str(tmp_path))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 99}
    assert SamplingParams(**defaults).top_k == 20
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert generation_defaults(str(tmp_path))["temperature"] == 0.0


def test_sharded_checkpoint_matches_transformers(peers, tmp_path):
    directory = build_checkpoint("qwen2", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (directory / "model.safetensors").exists()
    expected = reference_logits(load_reference(directory), SCORE_IDS)
    assert np.abs(_score(directory) - expected).max() <= MAX_ABS_DIFF


def test_bf16_checkpoint_loads_exactly(peers, tmp_path):
    """A bf16 checkpoint (numpy has no bfloat16) widened to f32 gives transformers' f32 logits on it."""
    directory = build_checkpoint("gemma2", tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((directory / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    expected = reference_logits(load_reference(directory), SCORE_IDS)  # loaded as f32
    assert np.abs(_score(directory, dtype="auto") - expected).max() <= MAX_ABS_DIFF


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_narrow_weight_dtypes(llama_dir, dtype):
    """--dtype bf16/f16 stores projections and the embedding narrow; activations stay f32. The
    reference is transformers in f32 on the same weights rounded to that dtype (norms stay f32)."""
    import torch

    from mistralrs_jax.loading.safetensors import load_hf_config
    from mistralrs_jax.loading.safetensors import build_model_from_hf

    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    model = build_model_from_hf(str(llama_dir), load_hf_config(str(llama_dir)), dtype=dtype)
    assert model.layers[0].self_attn.q_proj.weight[...].dtype.name == {"bf16": "bfloat16", "f16": "float16"}[dtype]
    assert model.embed_tokens.table[...].dtype.name == {"bf16": "bfloat16", "f16": "float16"}[dtype]
    reference = load_reference(llama_dir)
    with torch.no_grad():
        for param in reference.parameters():
            if param.ndim >= 2:
                param.copy_(param.to(torch_dtype).float())
    expected = reference_logits(reference, SCORE_IDS)
    diff = np.abs(_score(llama_dir, dtype=dtype) - expected).max()
    assert diff <= MAX_ABS_DIFF
    # ...and the rounding is real: the unrounded f32 model is much further from the reference.
    assert np.abs(reference_logits(load_reference(llama_dir), SCORE_IDS) - expected).max() > 10 * diff


def test_unknown_dtype_is_refused(llama_dir):
    from mistralrs_jax.errors import NotSupportedError
    from mistralrs_jax.loading.safetensors import load_hf_config
    from mistralrs_jax.loading.safetensors import build_model_from_hf

    with pytest.raises(NotSupportedError, match="f64"):
        build_model_from_hf(str(llama_dir), load_hf_config(str(llama_dir)), dtype="f64")


# -- errors a user meets -----------------------------------------------------------------------


def test_missing_shard_is_named(peers, tmp_path):
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import ModelNotFoundError

    directory = build_checkpoint("llama3", tmp_path / "broken", max_shard_size="40KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (directory / missing).unlink()
    with pytest.raises(ModelNotFoundError, match=missing):
        LLM(model=str(directory), **LLM_KWARGS)


def test_config_missing_a_required_key_is_named(llama_dir, tmp_path):
    import shutil

    from mistralrs_jax import LLM
    from mistralrs_jax.errors import ModelLoadError

    directory = tmp_path / "no_hidden_size"
    shutil.copytree(llama_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    del config["hidden_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        LLM(model=str(directory), **LLM_KWARGS)


@pytest.mark.parametrize("content", ["{\"hidden_size\": ", "[1, 2]"])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_a_broken_json_file_is_named_by_every_reader(llama_dir, tmp_path, name, content):
    """One contract for every JSON file of a checkpoint (json_files.read_json_object): invalid JSON,
    or a value that is not an object, is a CorruptModelFileError naming the file, whichever
    reader meets it first."""
    import shutil

    from mistralrs_jax.errors import CorruptModelFileError
    from mistralrs_jax.loading.safetensors import generation_defaults, load_hf_config
    from mistralrs_jax.loading.tokenizer import load_tokenizer
    from mistralrs_jax.models.vision import vision_architecture

    readers = {"config.json": [load_hf_config, vision_architecture],
               "generation_config.json": [load_hf_config, generation_defaults, load_tokenizer],
               "tokenizer_config.json": [load_tokenizer]}
    directory = tmp_path / "broken"
    shutil.copytree(llama_dir, directory)
    (directory / name).write_text(content)
    for read in readers[name]:
        with pytest.raises(CorruptModelFileError, match=name):
            read(str(directory))


def test_unsupported_architecture_is_named(peers, tmp_path):
    import torch
    import transformers

    from mistralrs_jax import LLM
    from mistralrs_jax.errors import UnsupportedArchitectureError

    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(config).to(torch.float32).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        LLM(model=str(tmp_path / "gpt2"), **LLM_KWARGS)


def test_checkpoint_not_matching_its_config_is_named(llama_dir, tmp_path):
    import shutil

    from mistralrs_jax.errors import ModelLoadError
    from mistralrs_jax.loading.safetensors import load_hf_config
    from mistralrs_jax.loading.safetensors import build_model_from_hf

    directory = tmp_path / "extra_layer"
    shutil.copytree(llama_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model.layers.2"):
        build_model_from_hf(str(directory), load_hf_config(str(directory)))


# -- memory --------------------------------------------------------------------------------------

PEAK_PROBE = textwrap.dedent("""
    import sys, threading, time
    def anonymous_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    import jax.numpy as jnp
    jnp.zeros(1).block_until_ready()
    from mistralrs_jax.loading.safetensors import load_hf_config
    from mistralrs_jax.loading.safetensors import build_model_from_hf
    config = load_hf_config(sys.argv[1])
    base = anonymous_kib(); peak = [base]; done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_kib()); time.sleep(0.001)
    sampler = threading.Thread(target=sample); sampler.start()
    model = build_model_from_hf(sys.argv[1], config)
    done.set(); sampler.join()
    print((peak[0] - base) * 1024)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from Linux's /proc")
def test_loading_holds_no_second_copy(peers, tmp_path):
    """Peak private memory while loading a ~90 MB checkpoint stays well under twice its size:
    tensors are read one at a time from the memory-mapped file, never all at once."""
    directory = build_checkpoint("llama2", tmp_path / "big", vocab_size=32000, hidden_size=512,
                                 intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8)
    file_bytes = (directory / "model.safetensors").stat().st_size
    assert file_bytes > 80e6
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(directory)], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = int(result.stdout.split()[-1])
    print(f"\npeak anonymous memory while loading: {peak / 1e6:.0f} MB for a {file_bytes / 1e6:.0f} MB checkpoint")
    assert peak < 1.3 * file_bytes


def test_isq_of_a_safetensors_checkpoint_matches_transformers_on_the_quantized_weights(llama_dir, monkeypatch):
    """`LLM(isq="Q8_0")` on a safetensors directory quantizes every projection at load: its logits
    equal transformers' on the same checkpoint with each projection replaced by gguf-py's Q8_0
    round trip (lm_head and embeddings stay at source precision); re_isq(None) gives the
    unquantized logits back.

    The weights are what is judged here, so the matmul is the XLA reference (f32 activations, as
    in transformers). The CPU kernel rounds activations to 8 bits as llama.cpp does (0.15 off
    on these logits) and is judged against llama.cpp by the quantization tests."""
    import gguf
    import torch

    from mistralrs_jax import LLM
    from pallas_kernels.quant_matmul import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "reference")
    with LLM(model=str(llama_dir), isq="Q8_0", **LLM_KWARGS) as llm:
        assert llm.isq_type == "Q8_0" and llm.isq_factory.summary().get("Q8_0", 0) == 7 * 2  # 7 per layer
        quantized = llm.score(SCORE_IDS)
        assert llm.re_isq("Q8_0") == "Q8_0"
        np.testing.assert_array_equal(llm.score(SCORE_IDS), quantized)  # in-place round trip is exact
    reference = load_reference(llama_dir)
    with torch.no_grad():
        for layer in reference.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                weight = proj.weight.numpy().astype(np.float32)
                blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
                roundtrip = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(weight.shape)
                proj.weight.copy_(torch.from_numpy(roundtrip))
    expected = reference_logits(reference, SCORE_IDS)
    assert np.abs(quantized - expected).max() <= MAX_ABS_DIFF
    unquantized = reference_logits(load_reference(llama_dir), SCORE_IDS)
    assert np.abs(quantized - unquantized).max() > 10 * np.abs(quantized - expected).max()  # ISQ really ran
