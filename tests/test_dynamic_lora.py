"""Per-request LoRA (`lora_mode="dynamic"`): adapters held unmerged in fixed slots, chosen per request.

Reference: transformers + PEFT's `PeftModel.from_pretrained` of the same adapter directories, on
tiny random Llama-3 and Mistral checkpoints (tests/family_fixtures.py) with random A and B
(tests/test_lora.py's `make_adapter`). One engine step holding three sequences (adapter 1,
adapter 2, none) must give each PEFT's logits of its own adapter at every position, and greedy
generation must give PEFT's tokens. The prefix cache must not hand a block computed under one
adapter to another. Through the real server (loopback, the real openai client) adapters are
added and removed while it serves, with no compile after warm-up.

Measured (JAX 0.10.2 XLA:CPU vs torch CPU, f32, 2026-12-07): max |Δ| to PEFT 4e-6 .. 8e-6 for each
request of the mixed step and for scores (llama3, mistral), 1.3e-5 for a separate q/k/v adapter on a
fused GGUF qkv, 2.2e-5 for Phi-3's fused adapters; against the same adapter merged 5e-6 .. 8e-6.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from family_fixtures import (VOCAB_SIZE, ReferenceUnavailable, build_checkpoint, convert_to_gguf, load_reference,
                             reference_greedy, reference_logits)
from peers import missing_peer, require_peer
from test_lora import ATTENTION, MLP, make_adapter

MAX_ABS_DIFF = 1e-4  # f32, summation order only
MIN_ADAPTER_EFFECT = 1.0
PROMPT_LENS = (13, 9, 11)  # adapter 1, adapter 2, base: one prefill step of 33 tokens
LLM_KWARGS = dict(max_seqs=4, max_num_batched_tokens=64, token_buckets=[2, 8, 64], pa_ctxt_len=256,
                  prefix_cache_n=16, lora_mode="dynamic", max_loras=3, max_lora_rank=8)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def family(request, tmp_path_factory) -> dict:
    for peer in ("torch", "transformers", "peft"):
        require_peer(peer)
    root = tmp_path_factory.mktemp(f"dynlora-{request.param}")
    checkpoint = build_checkpoint(request.param, root / "base")
    # Different ranks, scales and targets: a rank-4 adapter on everything, an rsLoRA rank-8 one on attention.
    first = make_adapter(checkpoint, root / "first", seed=1, r=4, lora_alpha=8, target_modules=ATTENTION + MLP)
    second = make_adapter(checkpoint, root / "second", seed=2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "o_proj"])
    return {"name": request.param, "checkpoint": checkpoint, "adapters": {"first": first, "second": second}}


def peft_model(checkpoint: Path, adapter: Path | None):
    from peft import PeftModel

    base = load_reference(checkpoint)
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter))


@pytest.fixture(scope="module")
def llm(family):
    from mistralrs_jax import LLM

    adapters = family["adapters"]
    with LLM(model=str(family["checkpoint"]), lora_adapters=[str(adapters["first"]), str(adapters["second"])],
             **LLM_KWARGS) as llm:
        yield llm


def test_mixed_step_matches_peft_per_request(family, llm):
    """ONE forward step: adapter 1, adapter 2 and the base model side by side, all positions."""
    runner = llm.runner
    names = ["first", "second", None]
    slots = [llm.resolve_lora(n).slot if n else -1 for n in names]
    blocks_per_run = 2  # 16-token blocks; block 0 is the trash block
    runs = [(ids, 0, list(range(1 + i * blocks_per_run, 1 + (i + 1) * blocks_per_run)))
            for i, ids in enumerate(prompts())]
    total = sum(PROMPT_LENS)
    shape = runner.padded_shape(total, len(runs))
    logits = np.asarray(runner.forward(runs, shape, list(PROMPT_LENS), total, lora_slots=slots))
    offset = 0
    for name, ids in zip(names, prompts()):
        expected = reference_logits(peft_model(family["checkpoint"], family["adapters"].get(name)), ids)
        got = logits[offset:offset + len(ids)]
        offset += len(ids)
        diff = np.abs(got - expected).max()
        print(f"\n{family['name']} {name or 'base'} in a mixed step: max |Δ| to PEFT {diff:.2e}")
        assert diff <= MAX_ABS_DIFF
        if name is not None:  # the adapter really changes the output
            base = reference_logits(peft_model(family["checkpoint"], None), ids)
            assert np.abs(expected - base).max() >= MIN_ADAPTER_EFFECT


def test_score_with_each_adapter_matches_peft_and_the_merged_adapter(family, llm):
    from mistralrs_jax import LLM

    ids = prompts()[0]
    for name in ("first", "second"):
        expected = reference_logits(peft_model(family["checkpoint"], family["adapters"][name]), ids)
        got = llm.score(ids, lora=name)
        diff = np.abs(got - expected).max()
        with LLM(model=str(family["checkpoint"]), lora_adapters=[str(family["adapters"][name])], warmup=False,
                 max_seqs=1, max_num_batched_tokens=64, token_buckets=[2, 64], pa_ctxt_len=128) as merged:
            to_merged = np.abs(got - merged.score(ids)).max()
        print(f"\n{family['name']} score({name}): max |Δ| to PEFT {diff:.2e}, to the merged adapter {to_merged:.2e}")
        assert diff <= MAX_ABS_DIFF and to_merged <= MAX_ABS_DIFF


def test_concurrent_greedy_requests_match_peft(family, llm):
    """Three requests submitted together (they share steps): each gets PEFT's greedy tokens."""
    from mistralrs_jax import SamplingParams

    names = ["first", None, "second"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    handles = [llm.engine.add_request(ids, llm.with_lora(params, name)) for name, ids in zip(names, prompts())]
    outputs = [h.result(timeout=120).outputs[0].token_ids for h in handles]
    for name, ids, got in zip(names, prompts(), outputs):
        expected = reference_greedy(peft_model(family["checkpoint"], family["adapters"].get(name)), ids, 8)
        assert got == expected, name
    # The same through the public API, one adapter for the whole call.
    assert llm.generate([prompts()[0]], params, lora="first")[0].outputs[0].token_ids == outputs[0]


def test_prefix_cache_is_not_shared_across_adapters(family, llm):
    """A prompt cached under adapter 1 is not reused for adapter 2 or the base model, but is for adapter 1."""
    from mistralrs_jax import SamplingParams

    ids = np.random.default_rng(11).integers(3, VOCAB_SIZE, size=40).tolist()  # two full 16-token blocks
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.reset_prefix_cache()

    assert run_and_count(llm, ids, params, "first") == 0
    assert run_and_count(llm, ids, params, "second") == 0
    assert run_and_count(llm, ids, params, None) == 0
    assert run_and_count(llm, ids, params, "first") == 32


def run_and_count(llm, ids, params, name) -> int:
    """Prompt tokens the prefix cache served for one request of `ids` under adapter `name`."""
    from mistralrs_jax.engine.sequence import Sequence

    seq = Sequence("probe", ids, llm.with_lora(params, name))
    cached = llm.block_manager.find_cached_prefix(seq)
    llm.generate([ids], params, lora=name)
    return len(cached) * llm.block_manager.block_size


def test_unknown_adapter_is_a_typed_404(llm):
    from mistralrs_jax.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["hi"], lora="nope")
    assert info.value.http_status == 404 and info.value.param == "lora" and "nope" in str(info.value)


# --------------------------------------------------------------------------- fused projections


def _score_against_peft(model: str, checkpoint: Path, adapter: Path, label: str, **kwargs) -> None:
    from mistralrs_jax import LLM

    ids = prompts()[0]
    expected = reference_logits(peft_model(checkpoint, adapter), ids)
    base = reference_logits(peft_model(checkpoint, None), ids)
    with LLM(model=model, lora_adapters=[str(adapter)], **{**LLM_KWARGS, "warmup": False, **kwargs}) as llm:
        got = llm.score(ids, lora=adapter.name)
        untouched = llm.score(ids)
    diff = np.abs(got - expected).max()
    print(f"\n{label}: max |Δ| to PEFT {diff:.2e} (base {np.abs(untouched - base).max():.2e})")
    assert np.abs(expected - base).max() >= MIN_ADAPTER_EFFECT
    assert diff <= MAX_ABS_DIFF and np.abs(untouched - base).max() <= MAX_ABS_DIFF


@pytest.mark.slow
def test_phi3_fused_projections_match_peft(tmp_path):
    """Phi-3 holds qkv_proj and gate_up_proj fused; its PEFT adapters are trained on them."""
    for peer in ("torch", "transformers", "peft"):
        require_peer(peer)
    checkpoint = build_checkpoint("phi3", tmp_path / "phi3")
    adapter = make_adapter(checkpoint, tmp_path / "fused", seed=5, r=4, lora_alpha=8,
                           target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    _score_against_peft(str(checkpoint), checkpoint, adapter, "phi3 fused adapter")


def llama_adapter_and_gguf(tmp_path: Path, seed: int, *convert_flags: str) -> tuple[Path, Path, Path]:
    """A tiny llama checkpoint, a PEFT adapter on every projection, and llama.cpp's f32 GGUF of it."""
    for peer in ("torch", "transformers", "peft"):
        require_peer(peer)
    checkpoint = build_checkpoint("llama3", tmp_path / "llama3")
    adapter = make_adapter(checkpoint, tmp_path / "adapter", seed=seed, r=4, lora_alpha=8,
                           target_modules=ATTENTION + MLP)
    gguf = tmp_path / "base.gguf"
    try:
        convert_to_gguf([(checkpoint, gguf, *convert_flags)])
    except ReferenceUnavailable as exc:
        missing_peer(f"llama.cpp's converter is unavailable: {exc}")
    return checkpoint, adapter, gguf


@pytest.mark.slow
def test_separate_adapter_on_a_fused_gguf_qkv_matches_peft(tmp_path):
    """llama.cpp's --fuse-qkv GGUF: one attn_qkv tensor, so each of the adapter's q/k/v parts
    gets its own rank block of the fused stack and its own rows (Q/K rows as the GGUF permutes them)."""
    checkpoint, adapter, gguf = llama_adapter_and_gguf(tmp_path, 6, "--fuse-qkv")
    _score_against_peft(str(gguf), checkpoint, adapter, "separate q/k/v adapter on a fused GGUF qkv")


# --------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def served(llm):
    from server.app import create_app
    from server.serving import BackgroundServer

    background = BackgroundServer(create_app(llm)).start()
    try:
        yield background.url
    finally:
        background.stop()


def test_server_adds_and_removes_adapters_while_serving(family, llm, served, tmp_path):
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=120)
    http = httpx.Client(base_url=served, timeout=120)
    base = llm.model_name
    ids = prompts()[0]
    tokenizer = llm.tokenizer

    def complete(**kwargs) -> str:
        body = dict(model=kwargs.pop("model", base), prompt=ids, max_tokens=6, temperature=0.0)
        return client.completions.create(**body, extra_body={"ignore_eos": True, **kwargs}).choices[0].text

    def peft_text(adapter) -> str:
        """PEFT's greedy tokens as text (the engine's streaming detokenizer may keep a leading space)."""
        return tokenizer.decode(reference_greedy(peft_model(family["checkpoint"], adapter), ids, 6)).strip()

    compiles = llm.metrics()["compiles"]
    assert {m.id for m in client.models.list().data} == {base, f"{base}:first", f"{base}:second"}
    first_text = complete(model=f"{base}:first")
    assert first_text.strip() == peft_text(family["adapters"]["first"])
    assert complete(lora="second").strip() == peft_text(family["adapters"]["second"])
    assert complete().strip() == peft_text(None)
    chat = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model=f"{base}:second", messages=chat, max_tokens=6, temperature=0.0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
    from mistralrs_jax import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert reply == llm.chat(chat, greedy, lora="second")[0].outputs[0].text  # the same adapter's tokens
    assert reply != llm.chat(chat, greedy)[0].outputs[0].text

    # Remove "first": a 404 for it from then on, by model name and by the lora field.
    gone = http.delete("/v1/loras/first")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError) as info:
        complete(model=f"{base}:first")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as info:
        complete(lora="first")
    assert info.value.body["param"] == "lora"
    assert http.delete("/v1/loras/first").status_code == 404

    # Load it again under another name (into the freed slot), then fill every slot: 409 after that.
    added = http.post("/v1/loras", json={"name": "again", "path": str(family["adapters"]["first"])})
    assert added.status_code == 201 and added.json()["model"] == f"{base}:again"
    assert complete(lora="again") == first_text
    assert http.post("/v1/loras", json={"name": "third", "path": str(family["adapters"]["second"])}).status_code == 201
    full = http.post("/v1/loras", json={"name": "fourth", "path": str(family["adapters"]["second"])})
    assert full.status_code == 409 and full.json()["error"]["code"] == "lora_slots_full"
    taken = http.post("/v1/loras", json={"name": "third", "path": str(family["adapters"]["second"])})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "lora_name_taken"
    assert sorted(a["id"] for a in http.get("/v1/loras").json()["data"]) == ["again", "second", "third"]
    assert llm.metrics()["compiles"] == compiles  # loading, clearing and selecting adapters compiled nothing
    status = http.get("/v1/status").json()["loras"]
    assert status["max_loras"] == 3 and sorted(a["id"] for a in status["loaded"]) == ["again", "second", "third"]

    # Bad input: each a typed 4xx naming what is wrong.
    assert http.delete("/v1/loras/third").status_code == 200
    wide = make_adapter(family["checkpoint"], tmp_path / "wide", seed=3, r=16, lora_alpha=16, target_modules=["q_proj"])
    head = make_adapter(family["checkpoint"], tmp_path / "head", seed=4, r=4, lora_alpha=8, target_modules=["lm_head"])
    elsewhere = write_peft_dir(tmp_path / "elsewhere", {"model.layers.7.self_attn.q_proj": (4, 32, 32)})
    cases = [({"name": "wide", "path": str(wide)}, 400, "lora_rank_too_large"),
             ({"name": "elsewhere", "path": str(elsewhere)}, 400, "invalid_adapter"),
             ({"name": "head", "path": str(head)}, 400, "not_supported"),
             ({"name": "nowhere", "path": str(tmp_path / "missing")}, 400, "invalid_adapter"),
             ({"name": "a:b", "path": str(wide)}, 400, None),
             ({"path": str(wide)}, 400, None)]
    for body, status, code in cases:
        answer = http.post("/v1/loras", json=body)
        assert answer.status_code == status, (body, answer.text)
        if code is not None:
            assert answer.json()["error"]["code"] == code, answer.text
    with pytest.raises(openai.BadRequestError):
        complete(model=f"{base}:again", lora="second")  # two different adapters named


def write_peft_dir(directory: Path, modules: dict[str, tuple[int, int, int]]) -> Path:
    """A hand-written PEFT LoRA directory: module -> (rank, in, out) with random factors."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for module, (rank, fan_in, fan_out) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(np.float32)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return directory


def test_removal_lets_running_requests_finish(family, llm):
    """Removal while a request runs with the adapter: it finishes with the adapter's tokens, and
    the slot is only reused once it has."""
    from mistralrs_jax import SamplingParams
    from mistralrs_jax.errors import InvalidRequestError

    ids = prompts()[1]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    name = "second"
    expected = llm.generate([ids], params, lora=name)[0].outputs[0].token_ids
    adapter = llm.resolve_lora(name)
    request = llm.engine.add_request(ids, llm.with_lora(params, name))  # its sequence holds the slot from here
    llm.unload_lora(name)  # long before 64 steps have run
    assert adapter.removed and adapter.in_use() == 1
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([ids], params, lora=name)  # new requests cannot select it
    assert info.value.http_status == 404
    assert request.result(timeout=120).outputs[0].token_ids == expected
    assert adapter.in_use() == 0
    # Its slot is free again: filling every slot ends in it.
    taken = {a.slot for a in llm.loras()}
    extras = [llm.load_lora(f"extra{i}", str(family["adapters"]["second"])).slot
              for i in range(llm.adapter_slots.num_slots - len(taken))]
    assert adapter.slot in extras and len(taken | set(extras)) == llm.adapter_slots.num_slots


# --------------------------------------------------------------------------- options


def test_command_line_maps_to_llm_kwargs(family):
    import inspect

    from mistralrs_jax import cli
    from mistralrs_jax.llm import LLM
    from test_lora import parse

    adapter = family["adapters"]["first"]
    kwargs = cli.build_llm_kwargs(parse(f"--lora-mode dynamic --max-loras 2 --max-lora-rank 8 lora "
                                        f"-m {family['checkpoint']} -a {adapter}"))
    assert (kwargs["lora_mode"], kwargs["max_loras"], kwargs["max_lora_rank"], kwargs["lora_adapters"]) == (
        "dynamic", 2, 8, [str(adapter)])
    assert set(kwargs) <= set(inspect.signature(LLM.__init__).parameters)
    assert "lora_mode" not in cli.build_llm_kwargs(parse(f"lora -m {family['checkpoint']} -a {adapter}"))


def test_refused_combinations_name_the_option(family):
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import InvalidRequestError, NotSupportedError

    with pytest.raises(InvalidRequestError, match="lora_mode"):
        LLM(model=str(family["checkpoint"]), lora_mode="sometimes")
    with pytest.raises(NotSupportedError, match="draft model"):
        LLM(model=str(family["checkpoint"]), draft_model=str(family["checkpoint"]), lora_mode="dynamic")
    with pytest.raises(InvalidRequestError, match="--max-lora-rank 2"):  # the start-up adapter is rank 4
        LLM(model=str(family["checkpoint"]), lora_adapters=[str(family["adapters"]["first"])], lora_mode="dynamic",
            max_lora_rank=2, warmup=False)


@pytest.mark.slow
def test_re_isq_keeps_the_adapters(tmp_path):
    """Re-quantizing a GGUF base while serving rebuilds every projection in place: the adapter
    stacks go back on them, so an adapter's effect survives (the base weights alone change)."""
    from mistralrs_jax import LLM

    checkpoint, adapter, gguf = llama_adapter_and_gguf(tmp_path, 7)
    ids = prompts()[0]
    expected = reference_logits(peft_model(checkpoint, adapter), ids) - reference_logits(peft_model(checkpoint, None),
                                                                                         ids)
    with LLM(model=str(gguf), lora_adapters=[str(adapter)], cpu_weights="f32",
             **{**LLM_KWARGS, "warmup": False}) as llm:
        llm.re_isq("Q8_0")
        effect = llm.score(ids, lora="adapter") - llm.score(ids)
    diff = np.abs(effect - expected).max()
    print(f"\nadapter effect after re-ISQ to Q8_0: max |Δ| to PEFT's {diff:.2e} (effect up to "
          f"{np.abs(expected).max():.1f})")
    assert np.abs(expected).max() >= MIN_ADAPTER_EFFECT and diff <= 0.05 * np.abs(expected).max()
