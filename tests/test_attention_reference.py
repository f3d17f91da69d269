"""The pure-JAX paged attention reference against a naive per-sequence softmax attention.

The naive version (numpy, f64) keeps each sequence's keys contiguous and applies the causal
(and sliding-window) mask directly; the reference reads the same keys through shuffled block
tables, with decode tokens and prefill chunks mixed in one ragged batch.
"""
import functools
import math

import jax

import numpy as np
import pytest

from mistralrs_jax.engine.runner import ModelRunner
from mistralrs_jax.config import ModelConfig
from pallas_kernels.paged_attention import paged_attention_reference
from peers import not_applicable


def naive_attention(q, keys, values, positions, scale, window=None, soft_cap=None):
    """q [n, H, D] at `positions`; keys/values [L, KVH, D] of this sequence (position = index)."""
    n, num_heads, _ = q.shape
    group = num_heads // keys.shape[1]
    out = np.zeros(q.shape, np.float64)
    for i in range(n):
        for h in range(num_heads):
            s = keys[:, h // group, :] @ q[i, h] * scale
            if soft_cap:
                s = soft_cap * np.tanh(s / soft_cap)
            idx = np.arange(len(keys))
            visible = idx <= positions[i]
            if window:
                visible &= idx > positions[i] - window
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ values[:, h // group, :]
    return out


class _Runner(ModelRunner):
    """Only the host-side metadata builder of the runner (no model)."""

    def __init__(self, block_size, max_model_len, window=None):
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.config = ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                                  num_heads=1, num_kv_heads=1, head_dim=8, sliding_window=window)


CASES = [  # (block_size, heads, kv_heads, window, soft_cap, mix): every value of each axis appears
    (16, 4, 4, None, None, "decode"), (16, 4, 4, None, None, "prefill"), (16, 4, 4, None, None, "mixed"),
    (32, 4, 1, None, None, "mixed"), (16, 8, 1, None, None, "mixed"), (32, 8, 2, None, None, "decode"),
    (16, 4, 1, 40, None, "mixed"), (32, 4, 4, 40, None, "prefill"), (16, 8, 1, 40, None, "decode"),
    (16, 4, 1, None, 30.0, "mixed"), (32, 8, 1, 40, 30.0, "mixed"),
]


def _require_cpu_kernel():
    from mistralrs_jax.quant.cpu_kernel import cpu_kernel_available

    if jax.default_backend() != "cpu" or not cpu_kernel_available():
        not_applicable("the CPU kernel library is not built here (x86-64 with AVX2 and a C++ compiler, CPU backend)")


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["xla", "cpu-kernel"])
@pytest.mark.parametrize("block_size,heads,kv_heads,window,soft_cap,mix", CASES)
def test_reference_matches_naive(block_size, heads, kv_heads, window, soft_cap, mix, cpu_kernel):
    """`cpu_kernel`: every row through the CPU kernel library's paged attention."""
    _check_against_naive(block_size, heads, kv_heads, window, soft_cap, mix, cpu_kernel, head_dim=16)


@pytest.mark.parametrize("head_dim", [12, 72, 256])
def test_cpu_kernel_head_dims(head_dim):
    """The kernel's vector loops over D: a scalar tail (12), 64-wide blocks plus an 8-wide one
    (72), four 64-wide blocks (Gemma's 256)."""
    _check_against_naive(16, 8, 2, None, None, "mixed", True, head_dim=head_dim)
    _check_against_naive(16, 4, 1, 40, 30.0, "mixed", True, head_dim=head_dim)


def _check_against_naive(block_size, heads, kv_heads, window, soft_cap, mix, cpu_kernel, head_dim):
    if cpu_kernel:
        _require_cpu_kernel()
    rng = np.random.default_rng(hash((block_size, heads, window, mix, head_dim)) % 2**32)
    num_blocks = 64
    max_model_len = 600
    # (context already cached, new tokens this step) per sequence
    shapes = {"decode": [(37, 1), (300, 1), (5, 1)],
              "prefill": [(0, 23), (270, 40)],
              "mixed": [(100, 1), (0, 1), (17, 1), (0, 30), (33, 9), (260, 20)]}[mix]
    free = list(rng.permutation(np.arange(1, num_blocks)))
    k_cache = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(np.float32)
    runs, seqs = [], []
    for cached, new in shapes:
        total = cached + new
        table = [int(free.pop()) for _ in range(math.ceil(total / block_size))]
        keys = rng.standard_normal((total, kv_heads, head_dim)).astype(np.float32)
        values = rng.standard_normal((total, kv_heads, head_dim)).astype(np.float32)
        for pos in range(total):  # the cache already holds this step's K/V too (written first)
            slot = table[pos // block_size] * block_size + pos % block_size
            k_cache[slot], v_cache[slot] = keys[pos], values[pos]
        runs.append((list(range(new)), cached, table))
        seqs.append((keys, values, cached, new))
    runner = _Runner(block_size, max_model_len, window)
    num_tokens = sum(new for *_, new in seqs)
    t_pad = num_tokens + 3  # some padding tokens too
    _, meta, _ = runner.build_metadata(runs, t_pad, len(runs) + 1)
    q = rng.standard_normal((t_pad, heads, head_dim)).astype(np.float32)
    scale = head_dim ** -0.5
    attend = jax.jit(functools.partial(paged_attention_reference, block_size=block_size, scale=scale,
                                       sliding_window=window, soft_cap=soft_cap, cpu_kernel=cpu_kernel))
    out = np.asarray(attend(q, k_cache, v_cache, meta))
    offset = 0
    for keys, values, cached, new in seqs:
        positions = np.arange(cached, cached + new)
        expected = naive_attention(q[offset:offset + new].astype(np.float64), keys.astype(np.float64),
                                   values.astype(np.float64), positions, scale, window, soft_cap)
        np.testing.assert_allclose(out[offset:offset + new], expected, atol=2e-5, rtol=2e-5)
        offset += new
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_a_step_never_copies_the_whole_cache(kv_heads):
    """Writing this step's K/V and attending must touch the cache in place: the compiled program
    may not hold a copy of a cache-sized buffer (which would make every step's time grow with
    the KV pool). XLA:CPU did that for one-KV-head caches (Gemma 3 270M) until the blocked
    view dropped the unit axis; this checks the optimized HLO, not a timing."""
    from pallas_kernels.paged_attention import write_kv

    block_size, heads, head_dim, num_blocks = 16, 4, 64, 96
    runner = _Runner(block_size, 600)
    _, meta, _ = runner.build_metadata([([0], 37, [3, 5, 7]), ([0, 1], 0, [9])], 8, 8)
    cache = jax.ShapeDtypeStruct((num_blocks * block_size, kv_heads, head_dim), np.float32)
    new = jax.ShapeDtypeStruct((8, kv_heads, head_dim), np.float32)
    q = jax.ShapeDtypeStruct((8, heads, head_dim), np.float32)

    def step(k_cache, v_cache, q, k, v, meta):
        k_cache, v_cache = write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = paged_attention_reference(q, k_cache, v_cache, meta, block_size=block_size, scale=0.125)
        return out, k_cache, v_cache

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(cache, cache, q, new, new, meta).compile().as_text()
    elements = num_blocks * block_size * kv_heads * head_dim
    copies = []
    for line in hlo.splitlines():
        head, _, rest = line.partition(" = ")
        if not rest or not ("copy" in rest.split("(")[0] or "copy" in head):
            continue
        dims = rest.split("[", 1)[1].split("]", 1)[0] if "[" in rest else ""
        if dims and math.prod(int(d) for d in dims.split(",") if d.strip().isdigit()) >= elements:
            copies.append(line.strip()[:160])
    assert not copies, f"the compiled step copies a whole KV cache ({kv_heads} KV heads):\n" + "\n".join(copies)


@pytest.mark.parametrize("window", [None, 24])
def test_cpu_kernel_rows_do_not_depend_on_batching(window):
    """A row's sums from the CPU kernel are the same bits whether the row is a one-token decode,
    one row of a prefill chunk, or batched beside other sequences: speculative verification and
    a chunked prefill then see exactly what decoding saw."""
    _require_cpu_kernel()
    rng = np.random.default_rng(7)
    block_size, heads, kv_heads, head_dim, num_blocks, total = 16, 6, 2, 64, 32, 90
    k_cache = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(np.float32)
    table = [int(b) for b in rng.permutation(np.arange(1, num_blocks))[:math.ceil(total / block_size)]]
    other = [int(b) for b in range(1, num_blocks) if b not in table][:2]
    q_rows = rng.standard_normal((total, heads, head_dim)).astype(np.float32)
    runner = _Runner(block_size, 600, window)
    attend = jax.jit(functools.partial(paged_attention_reference, block_size=block_size, scale=0.125,
                                       sliding_window=window, cpu_kernel=True))

    def run(runs, q):
        _, meta, _ = runner.build_metadata(runs, len(q), len(runs) + 1)
        return np.asarray(attend(q, k_cache, v_cache, meta))

    prefill = run([(list(range(total - 40)), 40, table)], q_rows[40:])  # positions 40..89, one chunk
    for pos in (40, 47, 48, 71, 89):
        decode = run([([0], pos, table)], q_rows[pos:pos + 1])
        batched = run([([0], 20, other), ([0], pos, table)], np.stack([q_rows[3], q_rows[pos]]))
        np.testing.assert_array_equal(decode[0], prefill[pos - 40])
        np.testing.assert_array_equal(batched[1], prefill[pos - 40])
