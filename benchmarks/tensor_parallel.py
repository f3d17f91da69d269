"""Tensor-parallel overhead on fake CPU devices, and the all-reduce traffic of one step.

    python -m benchmarks.tensor_parallel [--tp 1 2 4] [--reps 3] [--layers 8]

A random llama-shaped model (hidden 512, 8 query / 4 KV heads, MLP 1536, vocab 32000, f32)
is written with transformers, then served at each tensor-parallel size on
XLA_FLAGS=--xla_force_host_platform_device_count fake devices, which share the same CPU cores:
the ratio to tp=1 is the partitioning and communication overhead, not a speed-up.
Prefill is a max_tokens=1 run of a 64-token prompt; decode step time is
(T_33 - T_1) / 32 (as bench_engine.py). The all-reduces are counted in the compiled HLO
of one decode step: per layer, the two row-parallel outputs (o_proj, down_proj), each
[tokens, hidden] f32.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, KV_HEADS, FF, VOCAB = 512, 8, 4, 1536, 32000
ALL_REDUCE = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*\ball-reduce(?:-start)?\(")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}


def write_model(directory: Path, layers: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      intermediate_size=FF, vocab_size=VOCAB, num_hidden_layers=layers,
                                      max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(VOCAB)},
                                             "unk_token": "t0"}, "pre_tokenizer": {"type": "Whitespace"}}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))


def all_reduce_bytes(hlo: str) -> list[int]:
    """Bytes of each all-reduce's operand in a compiled HLO module's text."""
    sizes = []
    for dtype, dims in ALL_REDUCE.findall(hlo):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        sizes.append(count * BYTES.get(dtype, 4))
    return sizes


def measure(model_dir: Path, tp: int, reps: int, layers: int) -> dict:
    import numpy as np

    from mistralrs_jax import LLM, SamplingParams

    rng = np.random.default_rng(tp)
    with LLM(model=str(model_dir), tensor_parallel_size=tp, max_seqs=1, max_num_batched_tokens=64,
             token_buckets=[2, 64], pa_ctxt_len=512, prefix_cache_n=0) as llm:
        def run(tokens: int) -> float:
            prompt = rng.integers(3, VOCAB, size=64).tolist()
            start = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
            return time.perf_counter() - start

        run(1), run(33)  # untimed
        prefill = statistics.median(run(1) for _ in range(reps))
        full = statistics.median(run(33) for _ in range(reps))
        runner = llm.engine.runner
        inputs = runner.build_metadata([], 2, 1)
        hlo = runner._step_fn.lower(runner.state_leaves, runner._kv_spec, *inputs).compile().as_text()
        sizes = all_reduce_bytes(hlo)
    return {"tp": tp, "prefill_64_s": prefill, "decode_step_ms": (full - prefill) / 32 * 1e3,
            "all_reduces_per_step": len(sizes), "all_reduce_bytes_per_step_2_tokens": sum(sizes),
            "all_reduce_bytes_per_token_per_layer": (sum(sizes) / 2) / layers}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise SystemExit("run as a script: XLA_FLAGS must be set before JAX starts")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(args.tp)}").strip()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        write_model(model_dir, args.layers)
        rows = [measure(model_dir, tp, args.reps, args.layers) for tp in args.tp]
    base = rows[0]
    for row in rows:
        print(f"tp={row['tp']}: prefill(64) {row['prefill_64_s'] * 1e3:.0f} ms "
              f"(x{row['prefill_64_s'] / base['prefill_64_s']:.2f}), decode step {row['decode_step_ms']:.1f} ms "
              f"(x{row['decode_step_ms'] / base['decode_step_ms']:.2f}), {row['all_reduces_per_step']} all-reduces "
              f"per decode step, {row['all_reduce_bytes_per_token_per_layer']:.0f} B per token per layer")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
