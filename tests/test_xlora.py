"""X-LoRA against PEFT's XLoraModel running the same adapters and classifier.

Tiny random Llama-3 and Mistral checkpoints (tests/family_fixtures.py) get 2-3 PEFT LoRA adapters
with random A and B (test_lora.make_adapter) and an X-LoRA classifier with random weights, built by
PEFT itself (`get_peft_model(model, XLoraConfig(...))`). That in-memory PEFT model is the
reference: its logits (a forward pass runs the scaling pass and the real pass in hooks), its
scalings (`get_latest_scalings()`), and greedy decoding as `XLoraModel.generate` does it (no KV
cache: every step recomputes the whole sequence through both passes).

The X-LoRA directory the engine reads is written here, in PEFT's layout or mistral.rs' layout,
because PEFT 0.21's `save_pretrained` of an X-LoRA model is not loadable: it drops every
classifier layer whose Sequential index equals an adapter name ("0", "1", ...: its adapter-name
filter matches `.0.`), and writes the whole base model into each adapter sub-folder. The files
written hold exactly PEFT's tensors, under PEFT's key names or mistral.rs' (`inner.J`, `last`).

PEFT 0.21 also only runs an XLoraConfig whose adapter names are "0", "1", ...: it loads the
adapters under those names but activates the config's keys. So the PEFT-layout cases use them,
and the mistral.rs-layout case names its adapters freely.

Measured (JAX 0.10.2 XLA:CPU vs torch CPU, f32, logits within about ±15): max |Δ| to PEFT
9e-6 .. 3e-5 (adapters moving the logits by 14-16), scalings within 5e-6, greedy tokens identical.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import (HIDDEN, VOCAB_SIZE, ReferenceUnavailable, build_checkpoint, convert_to_gguf,
                             load_reference, reference_logits)
from peers import require_peer
from test_lora import make_adapter

MAX_ABS_DIFF = 1e-4
SCALINGS_DIFF = 2e-5  # measured 5e-7 - 4.8e-6 against PEFT (a softmax of f32 classifier logits); 4x headroom
MIN_ADAPTER_EFFECT = 1.0
SCORE_LEN = 40
NEW_TOKENS = 12
LLM_KWARGS = dict(warmup=False, max_seqs=4, max_num_batched_tokens=64, token_buckets=[8, 64], pa_ctxt_len=256,
                  prefix_cache_n=0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    """checkpoint + adapters, llama-style (2 adapters) and mistral-style (3, sliding window)."""
    for peer in ("torch", "transformers", "sentencepiece", "peft"):
        require_peer(peer)
    root = tmp_path_factory.mktemp("xlora")
    llama = build_checkpoint("llama3", root / "llama3")
    mistral = build_checkpoint("mistral", root / "mistral", seed=3)
    return {
        "llama3": (llama, [
            make_adapter(llama, root / "l0", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
            make_adapter(llama, root / "l1", seed=2, r=2, lora_alpha=4,
                         target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])]),
        "mistral": (mistral, [
            make_adapter(mistral, root / "m0", seed=4, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            make_adapter(mistral, root / "m1", seed=5, r=8, lora_alpha=8, use_rslora=True,
                         target_modules=["gate_proj", "up_proj", "down_proj"]),
            make_adapter(mistral, root / "m2", seed=6, r=2, lora_alpha=2, target_modules=["k_proj", "o_proj"])]),
    }


def peft_xlora(checkpoint: Path, adapters: list[Path], seed: int = 0, **options):
    """PEFT's XLoraModel on the checkpoint with random classifier weights (large enough that the
    scalings differ clearly between tokens and adapters)."""
    import peft
    import torch

    model = load_reference(checkpoint)
    model.config.use_cache = False  # XLoraModel requires it
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                              adapters={str(i): str(a) for i, a in enumerate(adapters)}, **options)
    xlora = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in xlora.named_parameters():
            if "internal_xlora_classifier" in name:
                fan_in = param.shape[-1] if param.ndim == 2 else 1
                param.copy_(2.0 * torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
    return xlora.eval()


def peft_module_indices(xlora) -> dict[str, int]:
    """Each adapted projection's scalings index, as PEFT assigned it (its XLoraLayer's layer_number)."""
    from peft.tuners import lora

    out = {}
    for name, module in xlora.named_modules():
        if isinstance(module, lora.Linear):
            out[name.split("lora_model.model.", 1)[1]] = module.forward.__self__.layer_number
    return out


def classifier_layers(xlora) -> list[tuple[np.ndarray, np.ndarray]]:
    import torch

    return [(m.weight.detach().numpy(), m.bias.detach().numpy())
            for m in xlora.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]


def write_xlora(xlora, adapters: list[Path], directory: Path, layout: str, checkpoint: Path) -> tuple[Path, Path]:
    """(the X-LoRA directory, a mistral.rs ordering file for it) in PEFT's or mistral.rs' layout."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    config = xlora.peft_config["default"]
    names = [str(i) for i in range(len(adapters))] if layout == "peft" else [f"expert_{i}" for i in range(len(adapters))]
    for name, adapter in zip(names, adapters):
        shutil.copytree(adapter, directory / name)
    layers = classifier_layers(xlora)
    if layout == "peft":
        config.save_pretrained(str(directory))
        save_file({k: v.detach().numpy().copy() for k, v in xlora.state_dict().items()
                   if "internal_xlora_classifier" in k}, str(directory / "adapter_model.safetensors"))
    else:
        options = {key: getattr(config, key) for key in (
            "layerwise_scalings", "xlora_depth", "xlora_size", "enable_softmax", "softmax_temperature", "top_k_lora",
            "enable_softmax_topk", "global_scaling_weight", "scaling_pass_value")}
        (directory / "xlora_config.json").write_text(json.dumps(
            {"hidden_size": HIDDEN, "base_model_id": str(checkpoint), "adapters": names,
             "enable_relu_and_dropout": True, **options}))
        tensors = {f"inner.{j}.{kind}": value for j, (w, b) in enumerate(layers[:-1])
                   for kind, value in (("weight", w), ("bias", b))}
        tensors.update({"last.weight": layers[-1][0], "last.bias": layers[-1][1]})
        save_file(tensors, str(directory / "xlora_classifier.safetensors"))
    ordering = directory.parent / f"{directory.name}-ordering.json"
    ordering.write_text(json.dumps({"order": names, "layers": peft_module_indices(xlora),
                                    "base_model_id": str(checkpoint)}))
    return directory, ordering


def token_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB_SIZE, size=n).tolist()


def peft_forward(xlora, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logits [T, V], scalings [T, groups, n]) of PEFT's forward over `ids`."""
    import torch

    with torch.inference_mode():
        logits = xlora(torch.tensor([ids])).logits[0].float().numpy()
    return logits, xlora.base_model.get_latest_scalings()[0].float().numpy()


def peft_greedy(xlora, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding as XLoraModel.generate runs it (use_cache=False: the whole sequence every step)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(peft_forward(xlora, ids)[0][-1])))
    return ids[len(prompt):]


def engine_scalings(llm, ids: list[int]) -> np.ndarray:
    """The engine's classifier output for `ids` (the scaling pass on a scratch cache)."""
    import jax.numpy as jnp

    runner, model = llm.runner, llm.model
    bs = runner.block_size
    t_pad = max(16, 1 << (len(ids) - 1).bit_length())
    blocks = t_pad // bs + 1
    shape = (blocks * bs, llm.model_config.num_kv_heads, llm.model_config.head_dim)
    caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(model.num_layers)]
    input_ids, meta, _ = runner.build_metadata([(list(ids), 0, list(range(1, blocks)))], t_pad, 1)
    scalings, _ = model.scalings(jnp.asarray(input_ids), meta, caches, bs)
    return np.asarray(scalings)[:len(ids)]


def greedy_params(n: int = NEW_TOKENS):
    from mistralrs_jax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


# --------------------------------------------------------------------------- matching PEFT

CASES = {
    # llama-style, PEFT's layout, one classifier layer, one scaling set for every projection
    "llama3-peft": ("llama3", "peft", dict()),
    # llama-style, per-projection scalings, a 2-layer classifier with top-1 and softmax over the kept one
    "llama3-peft-layerwise-topk": ("llama3", "peft", dict(layerwise_scalings=True, xlora_depth=2, xlora_size=32,
                                                          top_k_lora=1, enable_softmax_topk=True,
                                                          enable_softmax=False)),
    # mistral-style (sliding window), mistral.rs' layout and ordering file, 3 adapters,
    # a 3-layer classifier, temperature, top-2, global weight, and a non-zero scaling pass
    "mistral-mistralrs": ("mistral", "mistralrs", dict(layerwise_scalings=True, xlora_depth=3, xlora_size=24,
                                                       softmax_temperature=0.7, top_k_lora=2,
                                                       global_scaling_weight=0.8, scaling_pass_value=0.25)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_logits_scalings_and_greedy_match_peft(case, models, tmp_path):
    from mistralrs_jax import LLM

    family, layout, options = CASES[case]
    checkpoint, adapters = models[family]
    xlora = peft_xlora(checkpoint, adapters, seed=len(case), **options)
    directory, ordering = write_xlora(xlora, adapters, tmp_path / "xlora", layout, checkpoint)
    ids, prompts = token_ids(SCORE_LEN, seed=1), [token_ids(n, seed=n) for n in (5, 21, 37)]
    expected, expected_scalings = peft_forward(xlora, ids)
    base = reference_logits(load_reference(checkpoint), ids)
    expected_tokens = [peft_greedy(xlora, p, NEW_TOKENS) for p in prompts]

    order = {"xlora_order": str(ordering)} if layout == "mistralrs" else {}
    with LLM(model=str(checkpoint), xlora_model_id=str(directory), **order, **LLM_KWARGS) as llm:
        logits = llm.score(ids)
        scalings = engine_scalings(llm, ids)  # [T, 1, n] without layerwise scalings; PEFT repeats them per projection
        scalings = np.broadcast_to(scalings, (len(ids), expected_scalings.shape[1], scalings.shape[2]))
        outs = llm.generate(prompts, greedy_params())  # the three prompts batch into one prefill step
    diff, effect = np.abs(logits - expected).max(), np.abs(expected - base).max()
    print(f"\n{case}: max |Δ| logits {diff:.2e} (adapters move them by {effect:.1f}), scalings "
          f"{np.abs(scalings - expected_scalings).max():.2e}, shape {expected_scalings.shape}")
    assert scalings.shape == expected_scalings.shape
    assert np.abs(scalings - expected_scalings).max() <= SCALINGS_DIFF
    assert effect >= MIN_ADAPTER_EFFECT
    assert diff <= MAX_ABS_DIFF
    assert [out.outputs[0].token_ids for out in outs] == expected_tokens


# --------------------------------------------------------------------------- non-granular scalings


def fix_scalings_after(xlora, k: int) -> None:
    """PEFT's classifier with every position >= k given the scalings of position k - 1: the
    reference for --tgt-non-granular-index k (PEFT recomputes the whole sequence every step,
    so fixing them by position is exact)."""
    classifier = xlora.base_model.internal_xlora_classifier
    original = classifier.forward

    def forward(*args, **kwargs):
        scalings = original(*args, **kwargs)
        if scalings.shape[1] > k:
            scalings = scalings.clone()
            scalings[:, k:] = scalings[:, k - 1:k]
        return scalings

    classifier.forward = forward


def joining_mid_decode(llm, prompts: list[list[int]]) -> list:
    """The last prompt starts alone; the others are added once it has decoded 3 tokens."""
    first = llm.engine.add_request(prompts[-1], greedy_params())
    seen = 0
    for delta in first:
        seen += len(delta.token_ids)
        if seen >= 3:
            break
    rest = [llm.engine.add_request(p, greedy_params()) for p in prompts[:-1]]
    return [handle.result(timeout=300) for handle in [*rest, first]]


@pytest.mark.slow
def test_non_granular_scalings_batch_without_compiles(models, tmp_path):
    """k = 9: one prompt reaches position 9 while decoding (its scalings come from the KV slot of
    an earlier step), two inside their prompt (from the same step); all in one batch, after
    warm-up, with no compile. Run again with the last prompt first and the others joining while
    it decodes (steps mixing prefill and decode; its full blocks from the prefix cache)."""
    from mistralrs_jax import LLM

    k = 9
    checkpoint, adapters = models["llama3"]
    xlora = peft_xlora(checkpoint, adapters, seed=11, layerwise_scalings=True)
    directory, _ = write_xlora(xlora, adapters, tmp_path / "xlora", "peft", checkpoint)
    ids, prompts = token_ids(SCORE_LEN, seed=1), [token_ids(n, seed=n) for n in (5, 14, 37)]
    granular = peft_forward(xlora, ids)[0]
    fix_scalings_after(xlora, k)
    expected = peft_forward(xlora, ids)[0]
    expected_tokens = [peft_greedy(xlora, p, NEW_TOKENS) for p in prompts]

    with LLM(model=str(checkpoint), xlora_model_id=str(directory), tgt_non_granular_index=k,
             **{**LLM_KWARGS, "warmup": True, "prefix_cache_n": 16}) as llm:
        compiles = llm.metrics()["compiles"]
        outs = llm.generate(prompts, greedy_params())
        again = joining_mid_decode(llm, prompts)
        assert llm.metrics()["compiles"] == compiles, "an X-LoRA step compiled after warm-up"
        logits = llm.score(ids)
    print(f"\nnon-granular k={k}: max |Δ| {np.abs(logits - expected).max():.2e}; fixing moves PEFT's logits by "
          f"{np.abs(expected - granular)[k:].max():.2f}")
    assert np.abs(expected - granular)[:k].max() == 0 and np.abs(expected - granular)[k:].max() > 0.1
    assert np.abs(logits - expected).max() <= MAX_ABS_DIFF
    assert [out.outputs[0].token_ids for out in outs] == expected_tokens
    assert [out.outputs[0].token_ids for out in again] == expected_tokens


# --------------------------------------------------------------------------- a GGUF base


@pytest.mark.slow
def test_gguf_base_with_safetensors_adapters(models, tmp_path):
    """llama.cpp's f32 GGUF of the checkpoint (Q/K rows permuted in the file) under safetensors adapters.
    Re-quantizing it while serving is refused (the re-built projections would lose their stacks)."""
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import NotSupportedError

    checkpoint, adapters = models["llama3"]
    gguf = tmp_path / "llama3.gguf"
    try:
        convert_to_gguf([(checkpoint, gguf)])
    except ReferenceUnavailable as exc:
        pytest.skip(f"llama.cpp's converter is unavailable (the llama-cpp-python sdist could not be fetched): {exc}")
    xlora = peft_xlora(checkpoint, adapters, seed=12, layerwise_scalings=True, xlora_depth=2, xlora_size=16)
    directory, _ = write_xlora(xlora, adapters, tmp_path / "xlora", "peft", checkpoint)
    ids = token_ids(SCORE_LEN, seed=1)
    expected = peft_forward(xlora, ids)[0]
    with LLM(model=str(gguf), xlora_model_id=str(directory), **LLM_KWARGS) as llm:
        logits = llm.score(ids)
        with pytest.raises(NotSupportedError, match=r"re-quantizing \(re_isq\) an X-LoRA model is not supported"):
            llm.re_isq("Q8_0")
    print(f"\nGGUF base: max |Δ| {np.abs(logits - expected).max():.2e}")
    assert np.abs(logits - expected).max() <= MAX_ABS_DIFF


# --------------------------------------------------------------------------- through the server


@pytest.mark.slow
def test_server_completions_match_peft(models, tmp_path):
    """The real server on loopback, the real openai client: two token-id prompts in one request."""
    import openai
    from server.app import create_app
    from server.serving import BackgroundServer

    from mistralrs_jax import LLM

    checkpoint, adapters = models["llama3"]
    xlora = peft_xlora(checkpoint, adapters, seed=16, layerwise_scalings=True)
    directory, _ = write_xlora(xlora, adapters, tmp_path / "xlora", "peft", checkpoint)
    prompts = [token_ids(n, seed=n) for n in (7, 19)]
    expected = [peft_greedy(xlora, p, NEW_TOKENS) for p in prompts]
    with LLM(model=str(checkpoint), xlora_model_id=str(directory), **LLM_KWARGS) as llm:
        background = BackgroundServer(create_app(llm)).start()
        try:
            client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=120)
            reply = client.completions.create(model=llm.model_name, prompt=prompts, max_tokens=NEW_TOKENS,
                                              temperature=0.0, logprobs=0)
        finally:
            background.stop()
        texts = [llm.tokenizer.decode(tokens) for tokens in expected]
    choices = sorted(reply.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == texts
    assert all(len(c.logprobs.tokens) == NEW_TOKENS for c in choices)


# --------------------------------------------------------------------------- an adapted lm_head


@pytest.mark.slow
def test_lm_head_adapter_matches_peft_lora(models, tmp_path):
    """mistral.rs' X-LoRA adapts the lm_head too; PEFT's XLoraModel cannot load such an adapter (its
    key rewriting gives `model.model.lm_head`). So the reference is PEFT's plain LoRA: a classifier
    whose bias puts all the weight (1 - 1e-13) on the adapter with the lm_head gives that adapter
    alone, which `PeftModel` runs."""
    from safetensors.numpy import load_file, save_file

    from mistralrs_jax import LLM
    from test_lora import peft_logits

    checkpoint, adapters = models["mistral"]
    with_head = make_adapter(checkpoint, tmp_path / "head", seed=15, r=4, lora_alpha=8,
                             target_modules=["q_proj", "down_proj", "lm_head"])
    directory = tmp_path / "xlora"
    directory.mkdir()
    names = ["with_head", "other"]
    shutil.copytree(with_head, directory / names[0])
    shutil.copytree(adapters[0], directory / names[1])
    file = directory / names[0] / "adapter_model.safetensors"  # PEFT saves the unchanged base lm_head beside it
    save_file({k: v for k, v in load_file(str(file)).items() if "lora_" in k}, str(file))
    (directory / "xlora_config.json").write_text(json.dumps({"hidden_size": HIDDEN, "base_model_id": str(checkpoint),
                                                             "adapters": names}))
    rng = np.random.default_rng(0)
    save_file({"last.weight": (1e-3 * rng.standard_normal((2, HIDDEN))).astype(np.float32),
               "last.bias": np.array([30.0, 0.0], np.float32)}, str(directory / "xlora_classifier.safetensors"))
    ids = token_ids(SCORE_LEN, seed=1)
    expected = peft_logits(checkpoint, [with_head], token_ids=ids)
    base = reference_logits(load_reference(checkpoint), ids)
    with LLM(model=str(checkpoint), xlora_model_id=str(directory), **LLM_KWARGS) as llm:
        logits = llm.score(ids)
        assert llm.model.lm_head_adapted
    print(f"\nlm_head adapter: max |Δ| {np.abs(logits - expected).max():.2e}, effect {np.abs(expected - base).max():.1f}")
    assert np.abs(expected - base).max() >= MIN_ADAPTER_EFFECT
    assert np.abs(logits - expected).max() <= MAX_ABS_DIFF


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def xlora_dir(models, tmp_path_factory) -> tuple[Path, Path]:
    checkpoint, adapters = models["llama3"]
    xlora = peft_xlora(checkpoint, adapters, seed=13, layerwise_scalings=True)
    return write_xlora(xlora, adapters, tmp_path_factory.mktemp("bad") / "xlora", "mistralrs", checkpoint)


def edited_ordering(ordering: Path, tmp_path: Path, **changes) -> Path:
    data = {**json.loads(ordering.read_text()), **changes}
    path = tmp_path / "ordering.json"
    path.write_text(json.dumps(data))
    return path


def test_ordering_not_matching_the_adapters_is_refused(xlora_dir, tmp_path):
    from mistralrs_jax.loading.adapters.lora import AdapterMismatchError
    from mistralrs_jax.loading.adapters.xlora import load_xlora

    directory, ordering = xlora_dir
    swapped = edited_ordering(ordering, tmp_path, order=["expert_1", "expert_0"])
    with pytest.raises(AdapterMismatchError, match=r"ordering file .*ordering\.json: \"order\" lists "
                                                   r"\['expert_1', 'expert_0'\].*\['expert_0', 'expert_1'\]"):
        load_xlora(str(directory), str(swapped))
    layers = json.loads(ordering.read_text())["layers"]
    extra = edited_ordering(ordering, tmp_path, layers={**layers, "model.layers.0.mlp.gate_proj": len(layers)})
    with pytest.raises(AdapterMismatchError, match=r"ordering\.json: its \"layers\" do not match.*listed but no "
                                                   r"adapter targets them: model\.layers\.0\.mlp\.gate_proj"):
        load_xlora(str(directory), str(extra))
    del layers["model.layers.1.self_attn.q_proj"]
    missing = edited_ordering(ordering, tmp_path, layers=layers)
    with pytest.raises(AdapterMismatchError, match=r"adapted but not listed: model\.layers\.1\.self_attn\.q_proj"):
        load_xlora(str(directory), str(missing))


def test_config_file_path_names_the_model(xlora_dir, tmp_path):
    """-x may name the config JSON itself, under any file name (the seed's `-x ./xlora-config.json`)."""
    from mistralrs_jax.loading.adapters.xlora import load_xlora

    directory, ordering = xlora_dir
    copy = tmp_path / "xlora"
    shutil.copytree(directory, copy)
    (copy / "xlora_config.json").rename(copy / "xlora-config.json")
    ckpt = load_xlora(str(copy / "xlora-config.json"), str(ordering))
    assert ckpt.adapter_names == ["expert_0", "expert_1"] and ckpt.num_modules == 12
    assert ckpt.classifier_path == str(copy / "xlora_classifier.safetensors")


def test_peft_save_pretrained_without_classifier_layers_is_named(models, tmp_path):
    """PEFT 0.21's own save_pretrained loses classifier layers (see the module docstring): a typed
    error says which and why, before any adapter is read."""
    from mistralrs_jax.errors import ModelLoadError
    from mistralrs_jax.loading.adapters.xlora import load_xlora

    checkpoint, adapters = models["llama3"]
    peft_xlora(checkpoint, adapters, seed=14, xlora_depth=2, xlora_size=16).save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ModelLoadError, match=r"adapter_model\.safetensors holds layers \[3\] of PEFT's classifier, but "
                                             r"xlora_depth 2 puts its Linear layers at \[0, 3\]; PEFT's save_pretrained"):
        load_xlora(str(tmp_path / "saved"))


def test_settings_without_an_xlora_model_are_refused(models):
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import InvalidRequestError

    checkpoint, _ = models["llama3"]
    with pytest.raises(InvalidRequestError, match="--tgt-non-granular-index was given without an X-LoRA model"):
        LLM(model=str(checkpoint), tgt_non_granular_index=4, **LLM_KWARGS)
    with pytest.raises(InvalidRequestError, match="--tgt-non-granular-index must be a position of at least 1, got 0"):
        LLM(model=str(checkpoint), xlora_model_id="unused", tgt_non_granular_index=0, **LLM_KWARGS)


def test_classifier_not_fitting_the_base_is_refused(models, xlora_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from mistralrs_jax import LLM
    from mistralrs_jax.loading.adapters.lora import AdapterMismatchError

    checkpoint, _ = models["llama3"]
    directory, _ = xlora_dir
    broken = tmp_path / "xlora"
    shutil.copytree(directory, broken)
    file = broken / "xlora_classifier.safetensors"
    tensors = load_file(str(file))
    save_file({"last.weight": tensors["last.weight"][:-2], "last.bias": tensors["last.bias"][:-2]}, str(file))
    with pytest.raises(AdapterMismatchError, match=r"xlora_classifier\.safetensors does not fit the base model: it "
                                                   r"gives 22 outputs but 2 adapters x 12 adapted projections need 24"):
        LLM(model=str(checkpoint), xlora_model_id=str(broken), **LLM_KWARGS)
    save_file({"last.weight": np.zeros((24, HIDDEN // 2), np.float32)}, str(file))
    with pytest.raises(AdapterMismatchError, match=r"xlora_classifier\.safetensors reads 32 features, but "
                                                   r".*xlora_config\.json says hidden_size 64"):
        LLM(model=str(checkpoint), xlora_model_id=str(broken), **LLM_KWARGS)


def test_cli_serves_x_lora_lines(models, xlora_dir):
    """The mistral.rs command lines parse into an X-LoRA LLM; without -m the ordering file names the base."""
    import shlex

    from mistralrs_jax.cli import build_parser
    from mistralrs_jax.cli_kwargs import build_llm_kwargs

    checkpoint, _ = models["llama3"]
    directory, ordering = xlora_dir
    args = build_parser().parse_args(shlex.split(f"x-lora-plain -x {directory} -o {ordering} --tgt-non-granular-index 4"))
    kwargs = build_llm_kwargs(args)
    assert (kwargs["model"], kwargs["xlora_model_id"], kwargs["xlora_order"], kwargs["tgt_non_granular_index"]) == (
        str(checkpoint), str(directory), str(ordering), 4)
    args = build_parser().parse_args(shlex.split(f"x-lora-gguf -m {checkpoint.parent} -f llama3.gguf -x {directory} "
                                                 f"-o {ordering}"))
    kwargs = build_llm_kwargs(args)
    assert (kwargs["model"], kwargs["gguf_file"], kwargs["xlora_model_id"]) == (
        str(checkpoint.parent), "llama3.gguf", str(directory))
