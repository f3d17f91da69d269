"""What X-LoRA costs: decode throughput with X-LoRA (granular and non-granular) against the base model.

    python -m benchmarks.xlora [--model PATH] [--concurrency 1,8] [--tokens 64] [--rank 16] [--reps 2] [--out results/]

Three random PEFT LoRA adapters of rank --rank on every attention and MLP projection
(benchmarks/dynamic_lora.py writes them) and a random one-layer classifier with layerwise
scalings make an X-LoRA model in mistral.rs' layout, in a temporary directory. Rows, each C
requests at once (the same chat prompt, ignore_eos, exactly --tokens tokens each):

- ``base``: the model alone;
- ``xlora``: X-LoRA, scalings recomputed at every position (a scaling pass and a real pass per step);
- ``xlora_fixed``: X-LoRA with --tgt-non-granular-index at the prompt's length, so decode steps
  skip the scaling pass.

The engines are up together and the rows run interleaved (benchmarks/dynamic_lora.py's
`measure`): tokens per second of wall time and of this process's CPU time, medians over --reps.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.dynamic_lora import PROJECTIONS, PROMPT, measure, write_adapter
from benchmarks.machine import describe_machine


def write_xlora(directory: Path, config, rank: int) -> Path:
    """An X-LoRA model (mistral.rs' layout) over three random adapters, with a random classifier."""
    from safetensors.numpy import save_file

    names = [f"expert{i}" for i in range(3)]
    for i, name in enumerate(names):
        write_adapter(directory / name, config, rank, seed=i)
    projections = config.num_layers * sum(len(group) for group in PROJECTIONS.values())
    rng = np.random.default_rng(7)
    save_file({"last.weight": rng.standard_normal((len(names) * projections, config.hidden_size)).astype(np.float32)
               / config.hidden_size ** 0.5, "last.bias": np.zeros(len(names) * projections, np.float32)},
              str(directory / "xlora_classifier.safetensors"))
    (directory / "xlora_config.json").write_text(json.dumps(
        {"hidden_size": config.hidden_size, "adapters": names, "layerwise_scalings": True}))
    return directory


def _save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))


FLAGS = {
    "--model": {"help": "GGUF file or model id (default: SmolLM2-135M-Instruct)"},
    "--concurrency": {"default": "1,8", "help": "comma-separated numbers of requests at once"},
    "--tokens": {"type": int, "default": 64, "help": "tokens each request generates"},
    "--rank": {"type": int, "default": 16, "help": "rank of the random adapters"},
    "--reps": {"type": int, "default": 2, "help": "timed runs of each row (after one untimed)"},
    "--out": {"help": "directory for xlora.json"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.xlora", description=__doc__.split("\n")[0])
    for flag, options in FLAGS.items():
        parser.add_argument(flag, **options)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mistralrs_jax import LLM

    levels, machine = [int(c) for c in args.concurrency.split(",")], describe_machine()
    sizes = dict(max_seqs=max(levels), max_num_batched_tokens=64, token_buckets=[2, 16, 64])  # few step shapes
    base = LLM(args.model, **sizes)
    engines = [base]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            xlora_dir = str(write_xlora(Path(tmp) / "xlora", base.model_config, args.rank))
            prompt_len = len(base.chat_prompt_ids(PROMPT)[0])
            engines.append(LLM(args.model, xlora_model_id=xlora_dir, **sizes))
            engines.append(LLM(args.model, xlora_model_id=xlora_dir, tgt_non_granular_index=prompt_len, **sizes))
            rows = {"base": (engines[0], [None]), "xlora": (engines[1], [None]), "xlora_fixed": (engines[2], [None])}
            results = {c: measure(rows, c, args.tokens, args.reps) for c in levels}
    finally:
        for llm in engines:
            llm.shutdown()
    print(f"{'C':>4} {'row':>12} {'tok/s':>8} {'tok/cpu-s':>10} {'vs base (wall)':>15} {'vs base (cpu)':>14}")
    for c in levels:
        ref = results[c]["base"]
        for label, r in results[c].items():
            print(f"{c:>4} {label:>12} {r['tok_s']:>8.1f} {r['tok_per_cpu_s']:>10.1f} "
                  f"{r['tok_s'] / ref['tok_s']:>15.2f} {r['tok_per_cpu_s'] / ref['tok_per_cpu_s']:>14.2f}")
    if args.out:
        _save(Path(args.out) / "xlora.json", {"date": dt.datetime.now(dt.timezone.utc).isoformat(),
                                              "machine": machine, "settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
