"""Pallas GPU kernels against the pure-JAX references, run in Pallas interpret mode on CPU.

No GPU here, so three kinds of evidence:
- parity: each kernel, interpreted, gives the reference's numbers on tiny shapes for every
  case it serves (decode / prefill / mixed ragged batches, GQA 1/3/4/8, block sizes 16/32,
  sliding window, soft-cap, split-K, bf16 caches; every quant format);
- lowering: each kernel passes Pallas' Triton lowering for CUDA (shape and primitive rules
  are checked there), lowered from this CPU machine;
- the engine: a tiny random llama with quantized weights, driven by the real scheduler and
  runner with both kernels forced on (interpret), produces the reference's greedy tokens.
The packed-weight matmul kernels have their own file (test_packed_kernels.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistralrs_jax.config import ModelConfig
from mistralrs_jax.engine.runner import ModelRunner
from mistralrs_jax.errors import NotSupportedError
from mistralrs_jax.quant import quantize_packed
from pallas_kernels import paged_attention as attention_module
from pallas_kernels import quant_matmul as qmatmul_module
from pallas_kernels._compat import lower_for_cuda
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.paged_attention_pallas import paged_attention_pallas, triton_supports

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call Pallas' Triton lowering emits

# -- ragged batches ---------------------------------------------------------------------------

# (tokens already cached, tokens run this step) per sequence; contexts stay under 8 blocks
# of 16 so the KV pool (and so the interpreter's per-step copies) stays tiny.
MIXES = {
    "decode": [(37, 1), (100, 1), (5, 1), (0, 1)],
    "prefill": [(0, 23), (70, 40)],
    "mixed": [(90, 1), (0, 1), (17, 1), (0, 30), (33, 9), (50, 20)],
}


class _MetadataBuilder(ModelRunner):
    """The runner's host-side batch builder alone (no model, no cache)."""

    def __init__(self, block_size: int, max_model_len: int, window: int | None):
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.config = ModelConfig(arch="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                                  num_heads=1, num_kv_heads=1, head_dim=8, sliding_window=window)


def ragged_batch(mix: str, block_size: int, heads: int, kv_heads: int, head_dim: int, window, dtype, seed: int):
    """q, caches and metadata of one step as the runner builds it, with shuffled block tables."""
    rng = np.random.default_rng(seed)
    shapes = MIXES[mix]
    num_blocks = sum(math.ceil((c + n) / block_size) for c, n in shapes) + 2
    free = [int(b) for b in rng.permutation(np.arange(1, num_blocks))]
    runs = []
    for cached, new in shapes:
        table = [free.pop() for _ in range(math.ceil((cached + new) / block_size))]
        runs.append((list(range(new)), cached, table))
    num_tokens = sum(n for _, n in shapes)
    builder = _MetadataBuilder(block_size, max_model_len=128, window=window)
    _, meta, _ = builder.build_metadata(runs, num_tokens + 3, len(runs) + 1)  # padding tokens and a padding row
    k_cache = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(dtype)
    v_cache = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(dtype)
    q = rng.standard_normal((num_tokens + 3, heads, head_dim)).astype(np.float32)
    return q, k_cache, v_cache, meta, num_tokens


# Each case costs two compiles (~3-7 s on a loaded 2-core machine), so the conditions are
# spread over a few cases rather than crossed: every mix, GQA 1/3/4/8, both block sizes,
# window, soft-cap, split-K and multi-tile prefills each appear at least once.
ATTENTION_CASES = [
    # mix, block_size, heads, kv_heads, window, soft_cap, kernel options
    ("decode", 16, 4, 4, None, None, {}),
    ("decode", 32, 8, 1, 24, None, {"kv_splits": 4}),
    ("prefill", 16, 4, 1, None, None, {}),
    ("prefill", 32, 3, 1, 20, 30.0, {}),  # SmolLM2's 3 query heads per kv head (padded to 4 in the tile)
    ("mixed", 16, 8, 1, None, None, {}),
    ("mixed", 32, 4, 4, 40, 20.0, {}),
    ("mixed", 16, 8, 2, None, None, {"block_q": 4, "kv_splits": 3, "pages_per_step": 1}),  # split-K, many tiles
]


def _case_id(case):
    mix, bs, h, kvh, window, cap, opts = case
    return f"{mix}-bs{bs}-g{h // kvh}" + (f"-w{window}" if window else "") + (f"-cap{cap:g}" if cap else "") + \
        "".join(f"-{k}{v}" for k, v in opts.items())


class TestPagedAttentionInterpret:
    @pytest.mark.parametrize("case", ATTENTION_CASES, ids=_case_id)
    def test_matches_reference(self, case):
        mix, block_size, heads, kv_heads, window, soft_cap, options = case
        q, k_cache, v_cache, meta, num_tokens = ragged_batch(mix, block_size, heads, kv_heads, 16, window,
                                                             np.float32, seed=len(_case_id(case)))
        kwargs = dict(block_size=block_size, scale=16 ** -0.5, sliding_window=window, soft_cap=soft_cap)
        expected = np.asarray(paged_attention_reference(q, k_cache, v_cache, meta, **kwargs))
        kernel = jax.jit(lambda *args: paged_attention_pallas(*args, interpret=True, **kwargs, **options))
        out = np.asarray(kernel(q, k_cache, v_cache, meta))
        assert np.isfinite(out).all()
        # Padding tokens' outputs are garbage by contract (the reference leaves some at 0).
        np.testing.assert_allclose(out[:num_tokens], expected[:num_tokens], rtol=2e-5, atol=2e-5)

    def test_bf16_cache(self):
        q, k_cache, v_cache, meta, num_tokens = ragged_batch("mixed", 16, 4, 1, 16, None, jnp.bfloat16, seed=7)
        kwargs = dict(block_size=16, scale=0.25)
        expected = np.asarray(paged_attention_reference(q, k_cache, v_cache, meta, **kwargs))
        out = np.asarray(jax.jit(lambda *a: paged_attention_pallas(*a, interpret=True, **kwargs))(
            q, k_cache, v_cache, meta))
        # The kernel feeds bf16 q and probabilities to the matmuls (tensor-core inputs); f32 accumulation.
        np.testing.assert_allclose(out[:num_tokens], expected[:num_tokens], rtol=3e-2, atol=3e-2)


class TestAttentionDispatch:
    def test_default_on_cpu_is_reference(self, monkeypatch):
        monkeypatch.delenv("MISTRALRS_JAX_ATTENTION", raising=False)
        assert attention_module.dispatch() == "reference"

    def test_env_forces_interpret(self, monkeypatch):
        monkeypatch.setenv("MISTRALRS_JAX_ATTENTION", "interpret")
        assert attention_module.dispatch() == "pallas-interpret"
        q, k_cache, v_cache, meta, num_tokens = ragged_batch("decode", 16, 4, 1, 16, None, np.float32, seed=3)
        kwargs = dict(block_size=16, scale=0.25)
        traced = jax.make_jaxpr(lambda *a: attention_module.paged_attention(*a, **kwargs))(q, k_cache, v_cache, meta)
        assert "pallas_call" in str(traced)

    @pytest.mark.parametrize("value", ["pallas", "cuda"])
    def test_bad_choices_raise(self, monkeypatch, value):
        # "pallas" on a CPU would fail deep in XLA; say what to do instead.
        monkeypatch.setenv("MISTRALRS_JAX_ATTENTION", value)
        monkeypatch.setenv("MISTRALRS_JAX_QMATMUL", value)
        with pytest.raises(NotSupportedError, match="interpret"):
            attention_module.dispatch()
        with pytest.raises(NotSupportedError, match="interpret"):
            qmatmul_module.dispatch()

    def test_triton_shape_rules(self):
        assert triton_supports(64, 16) and triton_supports(128, 32) and triton_supports(256, 16)
        assert not triton_supports(80, 16) and not triton_supports(64, 24)


# -- Triton lowering (no GPU needed) ----------------------------------------------------------

class TestTritonLowering:
    @pytest.mark.parametrize("mix,heads,kv_heads,window,soft_cap,dtype", [
        ("decode", 8, 1, None, None, np.float32),
        ("mixed", 3, 1, 32, 30.0, np.float32),
        ("prefill", 4, 2, None, None, jnp.bfloat16),
    ])
    def test_attention_lowers(self, mix, heads, kv_heads, window, soft_cap, dtype):
        q, k_cache, v_cache, meta, _ = ragged_batch(mix, 16, heads, kv_heads, 64, window, dtype, seed=5)
        kwargs = dict(block_size=16, scale=0.125, sliding_window=window, soft_cap=soft_cap)
        text = lower_for_cuda(lambda *a: paged_attention_pallas(*a, **kwargs), q, k_cache, v_cache, meta)
        assert TRITON_CALL in text

    def test_attention_rejects_what_triton_cannot_tile(self):
        # The shape rule dispatch() relies on is real: head_dim 24 does not lower.
        q, k_cache, v_cache, meta, _ = ragged_batch("decode", 16, 4, 1, 24, None, np.float32, seed=6)
        with pytest.raises(Exception, match="power of 2"):
            lower_for_cuda(lambda *a: paged_attention_pallas(*a, block_size=16, scale=0.2), q, k_cache, v_cache, meta)


# -- the engine with both kernels forced on ---------------------------------------------------

def _tiny_llama(seed: int = 0):
    """A 2-layer llama with GQA 4, a sliding window and quantized projections (random weights)."""
    from mistralrs_jax.models.layers import Embedding, Linear, RMSNorm
    from mistralrs_jax.models.llama import LlamaDecoderLayer
    from mistralrs_jax.models.transformer import CausalLM

    config = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=1, head_dim=16, sliding_window=24, max_position_embeddings=256)
    rng = np.random.default_rng(seed)
    formats = {"q_proj": "Q8_0", "k_proj": "Q5_1", "v_proj": "Q4_0", "o_proj": "Q4_1", "gate_proj": "HQQ4",
               "up_proj": "IQ4_NL", "down_proj": "Q5_0"}
    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    layers = []
    for _ in range(config.num_layers):
        weights = {}
        for name, (out_f, in_f) in shapes.items():
            w = rng.standard_normal((out_f, in_f)).astype(np.float32) * (2.0 / math.sqrt(in_f))
            weights[name] = Linear(packed=quantize_packed(w, formats[name]))
        weights["input_layernorm"] = RMSNorm(1.0 + 0.1 * rng.standard_normal(64), 1e-5)
        weights["post_attention_layernorm"] = RMSNorm(1.0 + 0.1 * rng.standard_normal(64), 1e-5)
        layers.append(LlamaDecoderLayer(config, weights))
    embed = Embedding(rng.standard_normal((96, 64)).astype(np.float32))
    model = CausalLM(config, embed, layers, RMSNorm(np.ones(64, np.float32), 1e-5), lm_head=None)
    return model, config


def _greedy_generate(runner: ModelRunner, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The engine loop without threads: real scheduler and block manager, chunked prefill."""
    from mistralrs_jax.engine.block_manager import BlockManager
    from mistralrs_jax.engine.scheduler import Scheduler
    from mistralrs_jax.engine.sequence import Sequence
    from mistralrs_jax.sampling_params import SamplingParams

    scheduler = Scheduler(BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False),
                          max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128)
    seqs = [Sequence(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=max_new)) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        result = runner.execute(output.scheduled)
        sampled = {seq.seq_id: result.tokens(row) for row, (seq, _) in enumerate(output.scheduled)}
        for seq, _ in scheduler.update_after_step(output, sampled):
            if seq.num_output_tokens >= max_new and not seq.is_finished:
                scheduler.finish(seq, "length")
    return [list(seq.output_token_ids) for seq in seqs]


def test_engine_tokens_match_with_kernels_forced_on(monkeypatch):
    prompts = [[5, 17, 3, 88, 41], list(range(1, 31)), [60, 2] * 9]  # 30 tokens > 16: chunked; window 24 bites
    runs = {}
    for impl in ("reference", "interpret"):
        monkeypatch.setenv("MISTRALRS_JAX_ATTENTION", impl)
        monkeypatch.setenv("MISTRALRS_JAX_QMATMUL", impl)
        # A fresh model and runner per implementation: the choice is made at trace time and
        # each runner owns its jit caches, so the two can never share a compiled step.
        model, config = _tiny_llama()
        runner = ModelRunner(model, config, num_blocks=12, block_size=16, max_model_len=128, max_num_seqs=4,
                             max_num_batched_tokens=16, token_buckets=[4, 16], seq_buckets=[4])
        input_ids, meta, _ = runner.build_metadata([(prompts[0], 0, [1])], 16, 4)
        forward = jax.make_jaxpr(lambda ids, meta, kv: model(ids, meta, kv, 16))(input_ids, meta, runner.kv_caches)
        # 2 layers x (1 attention + 7 quantized projections) kernels, or none.
        assert str(forward).count("pallas_call[") == (16 if impl == "interpret" else 0)
        runs[impl] = (_greedy_generate(runner, prompts, max_new=6), runner.score(prompts[1]))
    assert runs["interpret"][0] == runs["reference"][0]
    assert all(len(tokens) == 6 for tokens in runs["reference"][0])
    np.testing.assert_allclose(runs["interpret"][1], runs["reference"][1], rtol=1e-4, atol=1e-4)
