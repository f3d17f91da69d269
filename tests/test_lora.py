"""LoRA adapters merged at load, against transformers + PEFT running the same adapter files.

A tiny random Llama checkpoint (tests/family_fixtures.py) gets PEFT adapters whose A and B are
both random (PEFT starts B at zero, which would make any merge look right). PEFT's own
`PeftModel.from_pretrained` of the saved directory is the reference: the engine must give its
teacher-forced logits from the safetensors checkpoint, from llama.cpp's GGUF conversion of it
(Q/K rows permuted, also fused into one attn_qkv tensor), under ISQ, and for two adapters mixed
with weights (PEFT's `add_weighted_adapter(..., "cat")` is the exact weighted sum of the deltas).

Measured (JAX 0.10.2 XLA:CPU vs torch 2.13 CPU, f32, 40 tokens, logits within about ±20):
max |Δ| to PEFT 5e-6 .. 2e-5 for every variant (safetensors, GGUF, fused GGUF, Phi-3, biases, rsLoRA,
patterns, two weighted adapters, and ISQ Q8_0 against PEFT's merged model put through gguf-py's
Q8_0); the adapters move the logits by 5 .. 16 from the base model's.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import (VOCAB_SIZE, ReferenceUnavailable, build_checkpoint, convert_to_gguf, load_reference,
                             reference_logits)
from peers import require_peer

MAX_ABS_DIFF = 1e-3  # f32 summation order; a missed module or a wrong scale moves logits by whole units
MIN_ADAPTER_EFFECT = 1.0  # the adapters must move the logits at least this far from the base model's
SCORE_LEN = 40
LLM_KWARGS = dict(warmup=False, max_seqs=1, max_num_batched_tokens=64, token_buckets=[2, 64], pa_ctxt_len=128,
                  prefix_cache_n=0)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    for peer in ("torch", "transformers", "sentencepiece", "peft"):
        require_peer(peer)
    return build_checkpoint("llama3", tmp_path_factory.mktemp("lora") / "llama3")


@pytest.fixture(scope="module")
def phi3_checkpoint(checkpoint) -> Path:
    """Phi-3: fused qkv_proj and gate_up_proj in the checkpoint itself."""
    return build_checkpoint("phi3", checkpoint.parent / "phi3")


@pytest.fixture(scope="module")
def gguf_files(checkpoint, phi3_checkpoint) -> dict[str, Path]:
    """llama.cpp's conversions: the llama checkpoint as f32, f32 with one fused attn_qkv, and Q8_0; Phi-3 as f32."""
    jobs = {"gguf": (checkpoint, checkpoint.parent / "llama3.gguf"),
            "gguf-fused-qkv": (checkpoint, checkpoint.parent / "llama3-fused.gguf", "--fuse-qkv"),
            "gguf-q8_0": (checkpoint, checkpoint.parent / "llama3-q8_0.gguf", "--outtype", "q8_0"),
            "phi3-gguf": (phi3_checkpoint, checkpoint.parent / "phi3.gguf")}
    try:
        convert_to_gguf(list(jobs.values()))
    except ReferenceUnavailable as exc:
        pytest.skip(f"llama.cpp's converter is unavailable (the llama-cpp-python sdist could not be fetched): {exc}")
    return {name: job[1] for name, job in jobs.items()}


def make_adapter(checkpoint: Path, directory: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter on the checkpoint with random A and B (and lora_B biases), and trained base
    biases (bias="lora_only"/"all") moved away from the checkpoint's, saved to `directory`."""
    import peft
    import torch

    model = peft.get_peft_model(load_reference(checkpoint), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            elif param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    return directory


def peft_logits(checkpoint: Path, adapters: list[Path], weights: list[float] | None = None,
                token_ids: list[int] | None = None) -> np.ndarray:
    """transformers + PEFT reading the saved adapters; several are mixed with add_weighted_adapter("cat")."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_reference(checkpoint), str(adapters[0]), adapter_name="a0")
    for index, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(str(adapter), adapter_name=f"a{index}")
    if len(adapters) > 1 or weights is not None:
        names = [f"a{i}" for i in range(len(adapters))]
        model.add_weighted_adapter(names, weights or [1.0] * len(adapters), "mix", combination_type="cat")
        model.set_adapter("mix")
    return reference_logits(model, token_ids or score_ids())


def score_ids() -> list[int]:
    return np.random.default_rng(1).integers(3, VOCAB_SIZE, size=SCORE_LEN).tolist()


@pytest.fixture(scope="module")
def base_logits(checkpoint) -> np.ndarray:
    return reference_logits(load_reference(checkpoint), score_ids())


@pytest.fixture(scope="module")
def adapter(checkpoint) -> Path:
    """Every projection and the (untied) lm_head: PEFT also saves the lm_head's base weight beside it."""
    return make_adapter(checkpoint, checkpoint.parent / "adapter-all", seed=0, r=4, lora_alpha=8,
                        target_modules=ATTENTION + MLP + ["lm_head"])


def engine_logits(model: Path, **kwargs) -> np.ndarray:
    from mistralrs_jax import LLM

    with LLM(model=str(model), **{**LLM_KWARGS, **kwargs}) as llm:
        return llm.score(score_ids())


def assert_matches(logits: np.ndarray, expected: np.ndarray, base: np.ndarray, label: str,
                   tolerance: float = MAX_ABS_DIFF) -> None:
    diff, effect = np.abs(logits - expected).max(), np.abs(expected - base).max()
    print(f"\n{label}: max |Δ| to PEFT {diff:.2e}; the adapter moves logits by {effect:.1f}")
    assert logits.shape == expected.shape
    assert effect >= MIN_ADAPTER_EFFECT
    assert diff <= tolerance


# --------------------------------------------------------------------------- matching PEFT


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "gguf-fused-qkv"])
def test_adapter_matches_peft(fmt, checkpoint, gguf_files, adapter, base_logits):
    """Every projection of both layers plus the lm_head, from the checkpoint and its GGUFs (where
    llama.cpp permuted Q/K rows, and in the fused file put q/k/v into one tensor)."""
    from mistralrs_jax import LLM

    expected = peft_logits(checkpoint, [adapter])
    path = checkpoint if fmt == "safetensors" else gguf_files[fmt]
    with LLM(model=str(path), lora_adapters=[str(adapter)], **LLM_KWARGS) as llm:
        logits = llm.score(score_ids())
        merged = llm.lora.summary()["merged_tensors"]
    # 2 layers x 7 projections (x 5 with q/k/v fused into one tensor) + lm_head
    assert len(merged) == (11 if fmt == "gguf-fused-qkv" else 15)
    assert_matches(logits, expected, base_logits, f"LoRA on {fmt}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_phi3_fused_projections_match_peft(fmt, phi3_checkpoint, gguf_files, tmp_path):
    """An adapter on Phi-3's own fused qkv_proj / gate_up_proj (llama.cpp: attn_qkv, ffn_up)."""
    adapter = make_adapter(phi3_checkpoint, tmp_path / "phi3-lora", seed=7, r=4, lora_alpha=8,
                           target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    expected = peft_logits(phi3_checkpoint, [adapter])
    base = reference_logits(load_reference(phi3_checkpoint), score_ids())
    logits = engine_logits(phi3_checkpoint if fmt == "safetensors" else gguf_files["phi3-gguf"],
                           lora_adapters=[str(adapter)])
    assert_matches(logits, expected, base, f"Phi-3 fused projections, {fmt}")


@pytest.mark.slow
def test_biases_match_peft(checkpoint, tmp_path):
    """Qwen2 (q/k/v biases): bias="lora_only" saves retrained base biases, which replace the
    checkpoint's; lora_bias adds scale * lora_B.bias, also on o_proj, which has no bias of its own."""
    qwen2 = build_checkpoint("qwen2", tmp_path / "qwen2")
    adapter = make_adapter(qwen2, tmp_path / "qwen2-lora", seed=9, r=4, lora_alpha=8, target_modules=ATTENTION,
                           bias="lora_only", lora_bias=True)
    expected = peft_logits(qwen2, [adapter])
    base = reference_logits(load_reference(qwen2), score_ids())
    logits = engine_logits(qwen2, lora_adapters=[str(adapter)])
    assert_matches(logits, expected, base, "retrained biases and lora_B biases")


@pytest.mark.slow
def test_fused_adapter_on_separate_projections(checkpoint, base_logits, tmp_path):
    """An adapter trained on a fused qkv_proj, on a checkpoint with separate q/k/v: its rows are
    split between them. Reference: PEFT running the equivalent separate adapter (q, k and v
    sharing one lora_A, lora_B's rows split)."""
    from safetensors.numpy import load_file, save_file

    separate = make_adapter(checkpoint, tmp_path / "separate", seed=8, r=4, lora_alpha=8,
                            target_modules=["q_proj", "k_proj", "v_proj"])
    tensors = load_file(str(separate / "adapter_model.safetensors"))
    fused = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn."
        shared_a = tensors[prefix + "q_proj.lora_A.weight"]
        for part in ("k_proj", "v_proj"):
            tensors[prefix + part + ".lora_A.weight"] = shared_a
        fused[prefix + "qkv_proj.lora_A.weight"] = shared_a
        fused[prefix + "qkv_proj.lora_B.weight"] = np.concatenate(
            [tensors[prefix + part + ".lora_B.weight"] for part in ("q_proj", "k_proj", "v_proj")])
    save_file(tensors, str(separate / "adapter_model.safetensors"))
    expected = peft_logits(checkpoint, [separate])
    fused_dir = write_adapter(tmp_path / "fused", fused, target_modules=["qkv_proj"])
    logits = engine_logits(checkpoint, lora_adapters=[str(fused_dir)])
    assert_matches(logits, expected, base_logits, "fused adapter split over q/k/v")


@pytest.mark.slow
def test_rslora_matches_peft(checkpoint, base_logits, tmp_path):
    """use_rslora: scale = alpha / sqrt(r), not alpha / r."""
    rslora = make_adapter(checkpoint, tmp_path / "rslora", seed=1, r=16, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    expected = peft_logits(checkpoint, [rslora])
    logits = engine_logits(checkpoint, lora_adapters=[str(rslora)])
    assert_matches(logits, expected, base_logits, "rsLoRA")


@pytest.mark.slow
def test_config_targeting_is_honoured(checkpoint, base_logits, tmp_path):
    """rank_pattern / alpha_pattern set per-module scales; layers_to_transform and exclude_modules,
    edited into adapter_config.json after saving, make PEFT skip saved modules: the engine must
    skip the same ones."""
    directory = make_adapter(checkpoint, tmp_path / "patterns", seed=2, r=4, lora_alpha=8,
                             target_modules=ATTENTION + MLP, rank_pattern={"down_proj": 2},
                             alpha_pattern={"o_proj": 32})
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(layers_to_transform=[1], exclude_modules=["v_proj"])
    config_path.write_text(json.dumps(config))
    expected = peft_logits(checkpoint, [directory])

    from mistralrs_jax import LLM

    with LLM(model=str(checkpoint), lora_adapters=[str(directory)], **LLM_KWARGS) as llm:
        logits = llm.score(score_ids())
        merged = llm.lora.summary()["merged_tensors"]
    assert merged == sorted(f"model.layers.1.{m}.weight" for m in
                            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj",
                             "mlp.up_proj", "mlp.down_proj"])
    assert_matches(logits, expected, base_logits, "rank/alpha patterns, layers_to_transform, exclude_modules")


@pytest.mark.slow
def test_weighted_adapters_from_an_ordering_file(checkpoint, gguf_files, base_logits, tmp_path):
    """Two adapters (different ranks, one rsLoRA, overlapping on q_proj) named by a mistral.rs
    ordering file with weights, through the `lora-gguf` command line, against PEFT's weighted sum."""
    from mistralrs_jax import LLM, cli

    root = tmp_path / "adapters"
    first = make_adapter(checkpoint, root / "first", seed=3, r=4, lora_alpha=8, target_modules=ATTENTION)
    second = make_adapter(checkpoint, root / "second", seed=4, r=6, lora_alpha=3, use_rslora=True,
                          target_modules=MLP + ["q_proj"])
    order = tmp_path / "ordering.json"
    order.write_text(json.dumps({"order": [{"name": "first", "weight": 0.7}, {"name": "second", "weight": -0.4}],
                                 "base_model_id": "ignored/for-lora-gguf"}))
    gguf = gguf_files["gguf"]
    kwargs = cli.build_llm_kwargs(cli.build_parser().parse_args(shlex.split(
        f"lora-gguf -m {gguf.parent} -f {gguf.name} -a {root} -o {order}")))
    assert kwargs["lora_adapters"] == [str(first), str(second)] and kwargs["lora_weights"] == [0.7, -0.4]

    expected = peft_logits(checkpoint, [first, second], [0.7, -0.4])
    with LLM(**{**kwargs, **LLM_KWARGS}) as llm:
        logits = llm.score(score_ids())
    assert_matches(logits, expected, base_logits, "two weighted adapters")


@pytest.mark.slow
def test_isq_quantizes_the_merged_weights(checkpoint, adapter, base_logits, monkeypatch):
    """--isq Q8_0 quantizes the merged weights: the logits equal transformers' on PEFT's merged
    model (merge_and_unload) with every projection replaced by gguf-py's Q8_0 round trip (the
    lm_head stays at source precision, as ISQ keeps it). Re-ISQ merges again from the source file.
    The weights are judged, so the matmul is the XLA reference (f32 activations, as in transformers;
    the CPU kernel rounds activations to 8 bits as llama.cpp does)."""
    import gguf
    import torch
    from peft import PeftModel

    from mistralrs_jax import LLM
    from pallas_kernels.quant_matmul import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "reference")

    merged = PeftModel.from_pretrained(load_reference(checkpoint), str(adapter)).merge_and_unload()
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, module in merged.named_modules():
            if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
                weight = module.weight.numpy().astype(np.float32)
                roundtrip = gguf.quants.dequantize(gguf.quants.quantize(weight, q8_0), q8_0).reshape(weight.shape)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(roundtrip, dtype=np.float32)))
    expected = reference_logits(merged, score_ids())
    with LLM(model=str(checkpoint), lora_adapters=[str(adapter)], isq="Q8_0", **LLM_KWARGS) as llm:
        assert llm.isq_factory.summary().get("Q8_0") == 14  # every projection but the lm_head
        logits = llm.score(score_ids())
        llm.re_isq("Q4_0")
        llm.re_isq("Q8_0")
        again = llm.score(score_ids())
    assert_matches(logits, expected, base_logits, "LoRA + ISQ Q8_0 vs PEFT merged + gguf-py Q8_0")
    np.testing.assert_array_equal(again, logits)


@pytest.mark.slow
def test_quantized_blocks_keep_unmerged_tensors_quantized(checkpoint, gguf_files, tmp_path, monkeypatch):
    """--cpu-weights quantized on a Q8_0 GGUF: merged tensors are held dense (their sum is in no
    block format), the others stay quantized; logits equal the all-f32 load's. The matmul is the
    XLA reference (f32 activations), so the comparison sees the weights alone."""
    from mistralrs_jax import LLM
    from pallas_kernels.quant_matmul import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "reference")
    q_only = make_adapter(checkpoint, tmp_path / "q-only", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"])
    path = gguf_files["gguf-q8_0"]
    dense = engine_logits(path, lora_adapters=[str(q_only)], cpu_weights="f32")
    with LLM(model=str(path), lora_adapters=[str(q_only)], cpu_weights="quantized", **LLM_KWARGS) as llm:
        attention = llm.model.layers[0].self_attn
        assert not attention.q_proj.quantized and attention.k_proj.quantized
        blocks = llm.score(score_ids())
    base = engine_logits(path, cpu_weights="f32")
    print(f"\nquantized blocks: max |Δ| to the f32 load {np.abs(blocks - dense).max():.2e}; "
          f"adapter effect {np.abs(dense - base).max():.1f}")
    assert np.abs(blocks - dense).max() <= MAX_ABS_DIFF
    assert np.abs(dense - base).max() >= MIN_ADAPTER_EFFECT


# --------------------------------------------------------------------------- refusals


def write_adapter(directory: Path, tensors: dict[str, np.ndarray], **config) -> Path:
    """An adapter directory written by hand (for files PEFT itself would not make)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def lora_pair(module: str, rank: int = 4, fan_in: int = 64, fan_out: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": rng.normal(size=(rank, fan_in)),
            f"{prefix}.lora_B.weight": rng.normal(size=(fan_out, rank))}


def test_module_the_model_lacks_is_refused(checkpoint, tmp_path):
    from mistralrs_jax import LLM
    from mistralrs_jax.loading.adapters import AdapterMismatchError

    directory = write_adapter(tmp_path / "deep", lora_pair("model.layers.5.self_attn.q_proj"))
    with pytest.raises(AdapterMismatchError, match=r"targets model\.layers\.5\.self_attn\.q_proj, which this model "
                                                   r"does not have \(llama architecture, 2 layers"):
        LLM(model=str(checkpoint), lora_adapters=[str(directory)], **LLM_KWARGS)


def test_shape_mismatch_is_refused(checkpoint, tmp_path):
    from mistralrs_jax import LLM
    from mistralrs_jax.loading.adapters import AdapterMismatchError

    directory = write_adapter(tmp_path / "narrow", lora_pair("model.layers.0.self_attn.q_proj", fan_in=32))
    with pytest.raises(AdapterMismatchError, match=r"narrow: model\.layers\.0\.self_attn\.q_proj has lora_B \[64, 4\] "
                                                   r"@ lora_A \[4, 32\], but the model's .* is \[64, 64\]"):
        LLM(model=str(checkpoint), lora_adapters=[str(directory)], **LLM_KWARGS)


@pytest.mark.parametrize("config, tensors, message", [
    ({"use_dora": True}, {}, "sets use_dora=True, which is not supported"),
    ({"peft_type": "XLORA"}, {}, r"an X-LoRA model is served with x-lora -x"),
    ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 128))}, "LoRA on an embedding table"),
    ({}, {"base_model.model.model.norm.weight": np.ones(64)}, "replaces model.norm, which is not a linear projection"),
])
def test_unsupported_adapters_are_refused_before_loading(config, tensors, message, tmp_path):
    """Refused while reading the adapter, naming it, before the base model is opened."""
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import NotSupportedError

    directory = write_adapter(tmp_path / "odd", {**lora_pair("model.layers.0.self_attn.q_proj"), **tensors}, **config)
    with pytest.raises(NotSupportedError, match=message) as info:
        LLM(model=str(tmp_path / "no-such-model"), lora_adapters=[str(directory)], **LLM_KWARGS)
    assert str(directory) in str(info.value)


def test_dora_from_peft_is_refused(checkpoint, tmp_path):
    from mistralrs_jax.loading.adapters import load_adapter
    from mistralrs_jax.errors import NotSupportedError

    directory = make_adapter(checkpoint, tmp_path / "dora", seed=6, r=4, lora_alpha=8, use_dora=True,
                             target_modules=["q_proj"])
    with pytest.raises(NotSupportedError, match="use_dora"):
        load_adapter(str(directory))


def test_pickled_adapter_reads_like_safetensors(checkpoint, adapter, tmp_path):
    """Older adapters ship adapter_model.bin (a torch pickle): the same factors and scales."""
    from peft import PeftModel

    from mistralrs_jax.loading.adapters import load_adapter

    PeftModel.from_pretrained(load_reference(checkpoint), str(adapter)).save_pretrained(
        tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled" / "adapter_model.safetensors").exists()
    pickled, reference = load_adapter(str(tmp_path / "pickled")), load_adapter(str(adapter))
    assert pickled.modules == reference.modules and len(reference.factors) == 15
    for module, factors in reference.factors.items():
        np.testing.assert_array_equal(pickled.factors[module].a, factors.a)
        np.testing.assert_array_equal(pickled.factors[module].b, factors.b)
        assert pickled.factors[module].scale == factors.scale == 2.0


def test_hub_adapter_folder_from_the_cache(adapter, tmp_path, monkeypatch):
    """`owner/repo/folder` goes through huggingface_hub (offline here: its cache, laid out as it
    lays it out) and lands on the folder inside the snapshot."""
    import shutil

    from mistralrs_jax.loading.adapters import load_adapter

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--loras"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(adapter, repo / "snapshots" / commit / "adapter_1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_adapter("org/loras/adapter_1")
    assert Path(loaded.path) == repo / "snapshots" / commit / "adapter_1" and len(loaded.factors) == 15


def test_missing_adapter_directory(tmp_path):
    from mistralrs_jax.loading.adapters import load_adapter
    from mistralrs_jax.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="LoRA adapter not found"):
        load_adapter(str(tmp_path / "nowhere"))
    (tmp_path / "repo" / "adapter_1").mkdir(parents=True)
    (tmp_path / "repo" / "adapter_1" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="it holds the adapters adapter_1"):
        load_adapter(str(tmp_path / "repo"))


# --------------------------------------------------------------------------- command line


def parse(command_line: str):
    from mistralrs_jax import cli

    return cli.build_parser().parse_args(shlex.split(command_line))


def test_lora_command_line_maps_to_llm_kwargs(checkpoint, adapter, tmp_path):
    import inspect

    from mistralrs_jax import cli
    from mistralrs_jax.llm import LLM

    kwargs = cli.build_llm_kwargs(parse(f"--isq Q8_0 lora -m {checkpoint} -a {adapter}"))
    assert (kwargs["model"], kwargs["lora_adapters"], kwargs["lora_weights"], kwargs["isq"]) == (
        str(checkpoint), [str(adapter)], [1.0], "Q8_0")
    assert set(kwargs) <= set(inspect.signature(LLM.__init__).parameters)
    # No -m: the base model named in the adapter's adapter_config.json, as mistral.rs does.
    assert cli.build_llm_kwargs(parse(f"lora -a {adapter}"))["model"] == str(checkpoint)
    # Several adapters, comma-separated; mistral.rs's other spelling of the flag.
    kwargs = cli.build_llm_kwargs(parse(f"lora-gguf -m d -f m.gguf --adapter-model-id {adapter},{adapter}"))
    assert kwargs["lora_adapters"] == [str(adapter)] * 2 and (kwargs["model"], kwargs["gguf_file"]) == ("d", "m.gguf")


def test_ordering_file_names_and_preloads(tmp_path):
    from mistralrs_jax import cli

    order = tmp_path / "order.json"
    order.write_text(json.dumps({"order": ["adapter_1", "extra"], "base_model_id": "org/base",
                                 "preload_adapters": [{"name": "extra", "adapter_model_id": "org/extra-lora"},
                                                      {"name": "unused", "adapter_model_id": "org/unused"}],
                                 "layers": {"model.layers.0.self_attn.q_proj": 0}}))
    kwargs = cli.build_llm_kwargs(parse(f"lora -a org/adapters -o {order}"))
    assert kwargs["model"] == "org/base"  # the ordering file's base_model_id
    assert kwargs["lora_adapters"] == ["org/adapters/adapter_1", "org/extra-lora"]
    assert kwargs["lora_weights"] == [1.0, 1.0]


def test_xlora_line_selects_the_xlora_model():
    """x-lora is served (tests/test_xlora.py); here only what the line selects."""
    from mistralrs_jax import cli

    kwargs = cli.build_llm_kwargs(parse("x-lora -m org/base -o orderings/xlora-paper-ordering.json -x lamm-mit/x-lora"))
    assert (kwargs["model"], kwargs["xlora_model_id"], kwargs["xlora_order"]) == (
        "org/base", "lamm-mit/x-lora", "orderings/xlora-paper-ordering.json")
