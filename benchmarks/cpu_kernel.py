"""The CPU quantized-matmul kernel (XLA FFI) against a plain f32 XLA dot.

    python -m benchmarks.cpu_kernel [--types Q4_0,Q4_1,Q8_0,Q4_K,Q6_K] [--tokens 1,4,16,64]
                                    [--shapes smollm2,1b,NxK] [--reps 30] [--out results/]

Shapes are (N out, K in) of real projections: SmolLM2-135M (576x576, 1536x576, 576x1536,
and its 49152x576 embedding / lm_head) and Llama-3.2-1B (2048x2048, 8192x2048). Each row of
the table is `x (T, K) @ W.T` inside a jitted program that runs 8 of them, each fed by the
last (the time per matmul is the program's / 8, so Python's dispatch is not counted), with
weights passed as arguments (not constants) so nothing is folded away: the kernel on raw
GGUF blocks, and `jnp.dot` on the same weights dequantized to f32. "G w/s" is weights (N * K) per second, so at T = 1 it is
the GEMV rate; "GB/s" is the bytes of the stored weights per second. --types takes every
format the kernel serves, the ones only ISQ writes (Q8_1, Q8_K, HQQ4, HQQ8) included.

The kernel uses XLA's intra-op threads (all cores unless XLA_FLAGS restricts them), as the
f32 dot does. On a machine shared with other work, wall-clock times swing with their load;
per-core figures that do not are had on one core with the process's CPU time:

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 python -m benchmarks.cpu_kernel --cpu-time

Writes `results/cpu_kernel-YYYYmmdd-HHMMSS.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mistralrs_jax.quant.cpu_kernel import cpu_kernel_available, load_kernel, quant_matmul_cpu, type_id
from mistralrs_jax.quant.cpu_kernel.blocks import LAYOUTS, random_blocks
from mistralrs_jax.quant.packed import PackedWeight

SHAPES = {
    "smollm2": [(576, 576), (1536, 576), (576, 1536), (49152, 576)],
    "1b": [(2048, 2048), (8192, 2048)],
}


def _shapes(name: str) -> list[tuple[int, int]]:
    """A named set, or one shape spelled NxK."""
    if name in SHAPES:
        return SHAPES[name]
    n, _, k = name.partition("x")
    return [(int(n), int(k))]


CHAIN = 8  # matmuls per jitted call, each fed by the last: in-program cost, not Python dispatch


def _chain(matmul):
    def step(x, w):
        for _ in range(CHAIN):
            x = x + 1e-3 * matmul(x, w)[:, :1]
        return x

    return step


def _best_s(fn, args, reps: int, clock=time.perf_counter) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(reps):
        t0 = clock()
        jax.block_until_ready(fn(*args))
        times.append(clock() - t0)
    return min(times)


def run(types: list[str], tokens: list[int], shape_sets: list[str], reps: int, clock=time.perf_counter) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n, k in (s for name in shape_sets for s in _shapes(name)):
        for tname in types:
            qtype = type_id(tname)
            if qtype not in LAYOUTS:
                raise SystemExit(f"the CPU kernel has no format {tname!r}; it takes ids {sorted(LAYOUTS)}")
            if k % LAYOUTS[qtype][0]:
                print(f"{tname:7s} {n:>6d}x{k:<5d} skipped: K is not a multiple of its {LAYOUTS[qtype][0]}-blocks")
                continue
            w = random_blocks(qtype, n, k, rng)
            w_f32 = PackedWeight(w, tname, k).dequantize().astype(np.float32)
            wq_dev, wf_dev = jnp.asarray(w), jnp.asarray(w_f32)
            kern = jax.jit(_chain(lambda x, w, q=qtype, k=k: quant_matmul_cpu(x, w, q, k)))
            dense = jax.jit(_chain(lambda x, w: jnp.dot(x, w.T)))
            for t in tokens:
                x = jnp.asarray(rng.standard_normal((t, k)).astype(np.float32))
                s_k = _best_s(kern, (x, wq_dev), reps, clock) / CHAIN
                s_f = _best_s(dense, (x, wf_dev), reps, clock) / CHAIN
                rows.append(
                    dict(type=tname, n=n, k=k, t=t, kernel_ms=s_k * 1e3, f32_ms=s_f * 1e3,
                         kernel_gws=n * k / s_k / 1e9, f32_gws=n * k / s_f / 1e9,
                         kernel_gbs=w.nbytes / s_k / 1e9, speedup=s_f / s_k)
                )
                r = rows[-1]
                print(
                    f"{tname:7s} {n:>6d}x{k:<5d} T={t:<3d} kernel {r['kernel_ms']:8.3f} ms {r['kernel_gws']:6.1f} Gw/s "
                    f"{r['kernel_gbs']:5.1f} GB/s | f32 {r['f32_ms']:8.3f} ms {r['f32_gws']:6.1f} Gw/s | x{r['speedup']:.2f}",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K,Q6_K")
    p.add_argument("--tokens", default="1,4,16,64")
    p.add_argument("--shapes", default="smollm2,1b")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default="results")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process's CPU time instead of the wall clock (see the module docstring)")
    a = p.parse_args(argv)
    if not cpu_kernel_available():
        print("the CPU kernel is unavailable here (see the log line above)")
        return 1
    print(f"kernel ISA: {load_kernel().isa}; cores: {os.cpu_count()}; jax {jax.__version__}")
    clock = time.process_time if a.cpu_time else time.perf_counter
    rows = run(a.types.split(","), [int(t) for t in a.tokens.split(",")], a.shapes.split(","), a.reps, clock)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_kernel-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    meta = dict(isa=load_kernel().isa, cpus=os.cpu_count(), clock="cpu" if a.cpu_time else "wall",
                xla_flags=os.environ.get("XLA_FLAGS", ""))
    path.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
