"""Pallas kernels against their pure-JAX references: time, achieved bandwidth and FLOP rate.

    python -m benchmarks.kernels [--reps 20] [--peak-gbs N] [--peak-tflops N] [--out results/]
                                 [--only attention|qmatmul]

On a GPU every workload runs twice, the Pallas kernel (Triton lowering) and the XLA
reference, and the table shows both, the speed-up and the largest difference between
their outputs. On a CPU the quantized matmuls run the XLA reference and the FFI kernel
that `dispatch()` picks (cpu-kernel), next to the dense f32 dot they replace; attention
times the reference only (interpret mode is a correctness tool, not timed here).

Rates are computed from the work the op must do, not what an implementation happens to
do: attention reads each sequence's K and V once (bytes) and spends 4 * heads * head_dim
FLOPs per (query, visible key) pair; a quantized matmul reads its weights once in their
stored form and does 2 * T * in * out FLOPs. The "% peak" columns use the device's
datasheet figures (dense bf16 tensor-core FLOPs, HBM bandwidth) for known GPUs, a
measured streaming read on CPUs, or `--peak-gbs` / `--peak-tflops`.

Writes `results/kernels-YYYYmmdd-HHMMSS.json` with every repetition.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mistralrs_jax.config import ModelConfig
from mistralrs_jax.engine.runner import ModelRunner
from mistralrs_jax.quant import quantize_packed
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.paged_attention_pallas import paged_attention_pallas
from pallas_kernels.quant_matmul import dispatch, quant_matmul

# Datasheet peaks: (HBM GB/s, dense bf16 tensor TFLOP/s). Matched by substring of device_kind.
GPU_PEAKS = {
    "H200": (4800.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100": (3350.0, 989.0),  # SXM
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100-PCIE-80GB": (1935.0, 312.0),
    "A100": (1555.0, 312.0),  # 40 GB
    "L40S": (864.0, 362.0),
    "L4": (300.0, 121.0),
    "A10G": (600.0, 70.0),
    "RTX 4090": (1008.0, 165.0),
}


@dataclasses.dataclass
class Result:
    workload: str
    impl: str
    seconds: list[float]
    bytes_moved: float
    flops: float
    max_abs_diff: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _time(fn: Callable, args: tuple, reps: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # compile and touch memory first
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return runs


def device_peaks(args) -> tuple[float | None, float | None, str]:
    """(GB/s, TFLOP/s, where they come from) for the default device."""
    device = jax.devices()[0]
    if args.peak_gbs or args.peak_tflops:
        return args.peak_gbs, args.peak_tflops, "given on the command line"
    if device.platform == "gpu":
        for name, (gbs, tflops) in GPU_PEAKS.items():
            if name.lower() in device.device_kind.lower():
                return gbs, tflops, f"datasheet for {name}"
        return None, None, f"unknown GPU {device.device_kind!r}: pass --peak-gbs/--peak-tflops"
    data = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB streamed by a reduction
    runs = _time(jax.jit(jnp.sum), (data,), 5)
    return data.nbytes / min(runs) / 1e9, None, "measured streaming read (jnp.sum over 256 MiB)"


# -- attention workloads ---------------------------------------------------------------------

class _BatchBuilder(ModelRunner):
    """The runner's host-side batch builder alone (no model, no cache)."""

    def __init__(self, block_size: int, max_model_len: int):
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.config = ModelConfig(arch="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                                  num_heads=1, num_kv_heads=1, head_dim=8)


def attention_workloads(on_gpu: bool) -> list[tuple[str, dict]]:
    # GPU: Llama-3-8B heads; CPU: SmolLM2-135M heads and shorter contexts.
    heads = dict(num_heads=32, kv_heads=8, head_dim=128) if on_gpu else dict(num_heads=9, kv_heads=3, head_dim=64)
    if on_gpu:
        return [
            ("decode 64 seqs x 2048 ctx", dict(heads, runs=[(2047, 1)] * 64)),
            ("decode 8 seqs x 8192 ctx", dict(heads, runs=[(8191, 1)] * 8)),
            ("prefill 1 x 2048", dict(heads, runs=[(0, 2048)])),
            ("mixed 32 decodes @1024 + 512-token chunk", dict(heads, runs=[(1023, 1)] * 32 + [(512, 512)])),
        ]
    return [
        ("decode 8 seqs x 512 ctx", dict(heads, runs=[(511, 1)] * 8)),
        ("prefill 1 x 256", dict(heads, runs=[(0, 256)])),
        ("mixed 4 decodes @256 + 64-token chunk", dict(heads, runs=[(255, 1)] * 4 + [(64, 64)])),
    ]


def attention_inputs(spec: dict, block_size: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    runs_spec = spec["runs"]
    max_len = max(c + n for c, n in runs_spec)
    num_blocks = sum(math.ceil((c + n) / block_size) for c, n in runs_spec) + 1
    tables = np.arange(1, num_blocks)
    rng.shuffle(tables)
    runs, used = [], 0
    for cached, new in runs_spec:
        count = math.ceil((cached + new) / block_size)
        runs.append((list(range(new)), cached, tables[used:used + count].tolist()))
        used += count
    num_tokens = sum(n for _, n in runs_spec)
    _, meta, _ = _BatchBuilder(block_size, max_len).build_metadata(runs, num_tokens, len(runs))
    shape = (num_blocks * block_size, spec["kv_heads"], spec["head_dim"])
    k_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((num_tokens, spec["num_heads"], spec["head_dim"])), dtype)
    # Work the op must do: one read of every sequence's K/V; 4*H*D FLOPs per visible pair (causal).
    kv_bytes = 2 * sum(c + n for c, n in runs_spec) * spec["kv_heads"] * spec["head_dim"] * jnp.dtype(dtype).itemsize
    pairs = sum(sum(c + i + 1 for i in range(n)) for c, n in runs_spec)
    flops = 4.0 * spec["num_heads"] * spec["head_dim"] * pairs
    return (q, k_cache, v_cache, jax.device_put(meta)), kv_bytes + 2 * q.nbytes, flops


# -- quantized matmul workloads --------------------------------------------------------------

def qmatmul_workloads(on_gpu: bool) -> list[tuple[str, dict]]:
    shape = dict(out_f=4096, in_f=4096) if on_gpu else dict(out_f=1536, in_f=576)  # CPU: SmolLM2 ffn_up
    tokens = [1, 16, 512] if on_gpu else [1, 16, 64]
    formats = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "HQQ4"] if on_gpu else ["Q4_1", "Q8_0", "Q5_0", "HQQ4"]
    return [(f"{qtype} T={t} {shape['out_f']}x{shape['in_f']}", dict(shape, qtype=qtype, tokens=t))
            for qtype in formats for t in tokens]


def qmatmul_inputs(spec: dict, act_dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((spec["out_f"], spec["in_f"])).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((spec["tokens"], spec["in_f"])), act_dtype)
    blocks = quantize_packed(w, spec["qtype"]).blocks
    flops = 2.0 * spec["tokens"] * spec["in_f"] * spec["out_f"]
    io_bytes = x.nbytes + spec["tokens"] * spec["out_f"] * 4
    return (x, jnp.asarray(blocks)), blocks.nbytes + io_bytes, flops


# -- running -----------------------------------------------------------------------------------

def run(args) -> dict:
    on_gpu = jax.default_backend() == "gpu"
    kv_dtype = jnp.bfloat16 if on_gpu else jnp.float32  # XLA:CPU is only fast in f32
    results: list[Result] = []

    def measure(name, ref_fn, kernel_fn, inputs, nbytes, flops, kernel_label="pallas"):
        ref_runs = _time(ref_fn, inputs, args.reps)
        results.append(Result(name, "reference (XLA)", ref_runs, nbytes, flops))
        if kernel_fn is not None:
            kernel_runs = _time(kernel_fn, inputs, args.reps)
            diff = float(jnp.max(jnp.abs(kernel_fn(*inputs).astype(jnp.float32) - ref_fn(*inputs).astype(jnp.float32))))
            label = "pallas (triton)" if kernel_label == "pallas" else kernel_label
            results.append(Result(name, label, kernel_runs, nbytes, flops, diff))

    if args.only in (None, "attention"):
        for name, spec in attention_workloads(on_gpu):
            inputs, nbytes, flops = attention_inputs(spec, args.block_size, kv_dtype)
            kw = dict(block_size=args.block_size, scale=spec["head_dim"] ** -0.5)
            ref = jax.jit(lambda q, k, v, m, kw=kw: paged_attention_reference(q, k, v, m, **kw))
            kernel = jax.jit(lambda q, k, v, m, kw=kw: paged_attention_pallas(q, k, v, m, **kw)) if on_gpu else None
            measure("attention: " + name, ref, kernel, inputs, nbytes, flops)

    if args.only in (None, "qmatmul"):
        for name, spec in qmatmul_workloads(on_gpu):
            inputs, nbytes, flops = qmatmul_inputs(spec, jnp.bfloat16 if on_gpu else jnp.float32)
            qtype = spec["qtype"]
            ref = jax.jit(lambda x, b, qtype=qtype: quant_matmul(x, b, qtype, impl="reference"))
            impl = dispatch(qtype)
            kernel = (jax.jit(lambda x, b, qtype=qtype, impl=impl: quant_matmul(x, b, qtype, impl=impl))
                      if impl in ("pallas", "cpu-kernel") else None)
            measure("qmatmul: " + name, ref, kernel, inputs, nbytes, flops, kernel_label=impl)
        if not on_gpu:  # the dense f32 dot the quantized kernels replace
            for t in (1, 16, 64):
                w = jnp.asarray(np.random.default_rng(0).standard_normal((576, 1536)), jnp.float32)
                x = jnp.asarray(np.random.default_rng(1).standard_normal((t, 576)), jnp.float32)
                measure(f"qmatmul: f32 dense T={t} 1536x576", jax.jit(lambda x, w: x @ w), None, (x, w),
                        w.nbytes + x.nbytes + t * 1536 * 4, 2.0 * t * 576 * 1536)

    peak_gbs, peak_tflops, peak_source = device_peaks(args)
    print_table(results, peak_gbs, peak_tflops, peak_source, on_gpu)
    device = jax.devices()[0]
    return {
        "machine": {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
                    "python": platform.python_version(), "host": platform.node(),
                    "peak_gbs": peak_gbs, "peak_tflops": peak_tflops, "peak_source": peak_source},
        "settings": {"reps": args.reps, "block_size": args.block_size, "kv_dtype": jnp.dtype(kv_dtype).name},
        "results": [dict(dataclasses.asdict(r), median=r.median) for r in results],
    }


def print_table(results: list[Result], peak_gbs, peak_tflops, peak_source: str, on_gpu: bool) -> None:
    device = jax.devices()[0]
    print(f"\ndevice: {device.device_kind} ({device.platform}), JAX {jax.__version__}; peaks: "
          f"{peak_gbs and f'{peak_gbs:.0f} GB/s'} / {peak_tflops and f'{peak_tflops:.0f} TFLOP/s'} ({peak_source})")
    header = (f"{'workload':58} {'impl':16} {'ms':>9} {'GB/s':>8} {'%bw':>6} {'TFLOP/s':>8} {'%flop':>6} "
              f"{'speedup':>8} {'maxdiff':>8}")
    print(header)
    print("-" * len(header))
    reference_ms = {}
    for r in results:
        ms = r.median * 1e3
        gbs = r.bytes_moved / r.median / 1e9
        tflops = r.flops / r.median / 1e12
        if r.impl.startswith("reference"):
            reference_ms[r.workload] = ms
        speedup = reference_ms.get(r.workload, ms) / ms
        print(f"{r.workload[:58]:58} {r.impl:16} {ms:9.3f} {gbs:8.1f} "
              f"{(f'{100 * gbs / peak_gbs:5.1f}%' if peak_gbs else '   n/a'):>6} {tflops:8.3f} "
              f"{(f'{100 * tflops / peak_tflops:5.1f}%' if peak_tflops else '   n/a'):>6} {speedup:7.2f}x "
              f"{(f'{r.max_abs_diff:.1e}' if r.max_abs_diff is not None else ''):>8}")
    if not on_gpu:
        print("\nOn CPU the quantized matmuls time the XLA reference and the FFI kernel (cpu-kernel); the Pallas "
              "kernels are compiled with Triton and need an NVIDIA GPU (interpret mode is a correctness tool).")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth peak to compare against")
    parser.add_argument("--peak-tflops", type=float, default=None, help="compute peak to compare against")
    parser.add_argument("--only", choices=["attention", "qmatmul"], default=None)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
