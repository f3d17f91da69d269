"""What per-request LoRA costs: decode throughput of a batch mixing adapters, against base-only.

    python -m benchmarks.dynamic_lora [--model PATH] [--concurrency 1,8] [--tokens 64] [--rank 16]
                                      [--max-loras 4] [--reps 2] [--out results/]

Three random PEFT LoRA adapters of rank --rank on every attention and MLP projection are
written for the model (its own shapes, a temporary directory). For each concurrency C, C
requests (the same prompt, ignore_eos, exactly --tokens tokens each) run at once:

- ``merged_base``: an engine started without per-request LoRA (lora_mode="merged", no adapters);
- ``dynamic_base``: an engine with --max-loras slots loaded, every request on the base model;
- ``dynamic_mixed``: the same engine, requests cycling over the three adapters and the base model,
  so each step mixes all four.

Both engines are up together and the rows run interleaved, rep after rep. Reported: generated
tokens per second of wall time and per second of this process's CPU time (the steadier figure
when other work shares the machine), medians over --reps after one untimed run of each, and
each dynamic row against ``merged_base``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe_machine

logger = logging.getLogger(__name__)

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(directory: Path, config, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter directory with random A and B for `config`'s projections."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    tensors = {}
    for layer in range(config.num_layers):
        for group, names in PROJECTIONS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                key = f"base_model.model.model.layers.{layer}.{group}.{name}"
                tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / fan_in ** 0.5).astype(np.float32)
                tensors[f"{key}.lora_B.weight"] = (0.1 * rng.standard_normal((fan_out, rank)) / rank ** 0.5
                                                   ).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": [n for names in PROJECTIONS.values() for n in names]}))
    return directory


def _run(llm, concurrency: int, tokens: int, loras: list[str | None]) -> dict:
    from mistralrs_jax import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    ids, _ = llm.chat_prompt_ids(PROMPT)
    llm.reset_prefix_cache()
    start, cpu_start = time.perf_counter(), time.process_time()
    handles = [llm.engine.add_request(ids, llm.with_lora(params, loras[i % len(loras)]))
               for i in range(concurrency)]
    generated = sum(len(handle.result().outputs[0].token_ids) for handle in handles)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tok_s": generated / wall, "tok_per_cpu_s": generated / cpu, "generated": generated, "wall_s": wall}


def measure(rows: dict, concurrency: int, tokens: int, reps: int) -> dict:
    """rows: label -> (llm, adapter names to cycle over); run interleaved, one untimed run each first."""
    runs: dict[str, list[dict]] = {label: [] for label in rows}
    for rep in range(reps + 1):
        for label, (llm, loras) in rows.items():
            result = _run(llm, concurrency, tokens, loras)
            if rep:
                runs[label].append(result)
    return {label: {key: statistics.median(r[key] for r in runs[label]) for key in ("tok_s", "tok_per_cpu_s")}
            | {"runs": runs[label]} for label in rows}


def print_rows(results: dict, baseline: str) -> None:
    """The table of `measure` results per concurrency, each row against the `baseline` row."""
    width = max(len(label) for rows in results.values() for label in rows)
    print(f"{'C':>4} {'row':>{width}} {'tok/s':>8} {'tok/cpu-s':>10} {'ratio (wall)':>13} {'ratio (cpu)':>12}")
    for c, rows in results.items():
        ref = rows[baseline]
        for label, r in rows.items():
            print(f"{c:>4} {label:>{width}} {r['tok_s']:>8.1f} {r['tok_per_cpu_s']:>10.1f} "
                  f"{r['tok_s'] / ref['tok_s']:>13.2f} {r['tok_per_cpu_s'] / ref['tok_per_cpu_s']:>12.2f}")


def write_json(path: Path, machine: dict, settings: dict, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": machine, "settings": settings,
              "results": results}
    path.write_text(json.dumps(record, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dynamic_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or model id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated numbers of requests at once")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--rank", type=int, default=16, help="rank of the random adapters (and --max-lora-rank)")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None, help="directory for dynamic_lora.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mistralrs_jax import LLM

    levels = [int(c) for c in args.concurrency.split(",")]
    machine = describe_machine()
    merged = LLM(args.model, max_seqs=max(levels))
    dynamic = LLM(args.model, max_seqs=max(levels), lora_mode="dynamic", max_loras=args.max_loras,
                  max_lora_rank=args.rank)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            names = [f"lora{i}" for i in range(3)]
            for i, name in enumerate(names):
                dynamic.load_lora(name, str(write_adapter(Path(tmp) / name, merged.model_config, args.rank, seed=i)))
            rows = {"merged_base": (merged, [None]), "dynamic_base": (dynamic, [None]),
                    "dynamic_mixed": (dynamic, [*names, None])}
            results = {c: measure(rows, c, args.tokens, args.reps) for c in levels}
    finally:
        merged.shutdown()
        dynamic.shutdown()
    print_rows(results, "merged_base")
    if args.out:
        write_json(Path(args.out) / "dynamic_lora.json", machine, vars(args), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
