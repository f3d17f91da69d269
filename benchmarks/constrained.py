"""What a grammar constraint costs: host mask time per step, and throughput with and without.

    python -m benchmarks.constrained [--model PATH] [--concurrency 1,16] [--tokens 64] [--reps 2]
                                     [--out results/]

For each concurrency C, C requests run at once on one engine, twice: free (ignore_eos, so every
request makes exactly --tokens tokens) and constrained by a JSON schema that cannot finish within
--tokens tokens (an array of at least 200 small objects, so every request also makes exactly
--tokens tokens of JSON). Reported per C (median over --reps, after one untimed warm-up of each):

- ``mask_ms_per_step``: host time filling the token bitmask for one engine step (all constrained
  rows of the step together, llguidance's parallel fill when there are several), from the engine's
  ConstraintTracker counters;
- ``free_tok_s`` / ``constrained_tok_s``: generated tokens per second of wall time, and their ratio
  (the target is >= 0.8); ``cpu_ratio``: the same ratio per second of this process's CPU time, the
  steadier figure when other work shares the machine.

The mask is filled while the device runs the step's forward (engine/runner.py), so on an
accelerator it hides behind the model; on a CPU the two share the cores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from benchmarks.machine import describe_machine

logger = logging.getLogger(__name__)

SCHEMA = {
    "type": "array", "minItems": 200,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string", "maxLength": 16},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo", "Lima"]}}},
}
PROMPT = [{"role": "user", "content": "List people as JSON: name, age and city for each."}]


def _run(llm, concurrency: int, tokens: int, constrained: bool) -> dict:
    from mistralrs_jax import SamplingParams
    from mistralrs_jax.guidance import GuidedDecoding

    guided = GuidedDecoding("json_schema", SCHEMA) if constrained else None
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=tokens, ignore_eos=not constrained,
                            guided_decoding=guided)
    ids, _ = llm.chat_prompt_ids(PROMPT)
    tracker = llm.engine.constraints
    mask_s, mask_steps = tracker.mask_seconds, tracker.mask_steps
    llm.reset_prefix_cache()
    start, cpu_start = time.perf_counter(), time.process_time()
    handles = [llm.engine.add_request(ids, params) for _ in range(concurrency)]
    outputs = [handle.result() for handle in handles]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    generated = sum(len(out.outputs[0].token_ids) for out in outputs)
    steps = tracker.mask_steps - mask_steps
    return {"tok_s": generated / wall, "tok_per_cpu_s": generated / cpu, "generated": generated, "wall_s": wall,
            "mask_ms_per_step": 1000 * (tracker.mask_seconds - mask_s) / steps if steps else None,
            "finish": sorted({out.outputs[0].finish_reason for out in outputs})}


def measure(llm, concurrency: int, tokens: int, reps: int) -> dict:
    runs: dict[str, list[dict]] = {"free": [], "constrained": []}
    for kind in runs:  # untimed warm-ups (the first constrained request also builds the llguidance tokenizer)
        _run(llm, concurrency, tokens, kind == "constrained")
    for _ in range(reps):
        for kind in runs:
            runs[kind].append(_run(llm, concurrency, tokens, kind == "constrained"))
    def median(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    free, constrained = median("free", "tok_s"), median("constrained", "tok_s")
    return {"concurrency": concurrency, "tokens": tokens, "mask_ms_per_step": median("constrained", "mask_ms_per_step"),
            "free_tok_s": free, "constrained_tok_s": constrained, "ratio": constrained / free,
            "cpu_ratio": median("constrained", "tok_per_cpu_s") / median("free", "tok_per_cpu_s"), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.constrained", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or model id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated numbers of requests at once")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None, help="directory for constrained.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mistralrs_jax import LLM

    levels = [int(c) for c in args.concurrency.split(",")]
    llm = LLM(args.model, max_seqs=max(levels))
    try:
        results = [measure(llm, c, args.tokens, args.reps) for c in levels]
    finally:
        llm.shutdown()
    print(f"{'C':>4} {'mask ms/step':>13} {'free tok/s':>11} {'constrained tok/s':>18} {'ratio':>6} {'cpu ratio':>10}")
    for r in results:
        print(f"{r['concurrency']:>4} {r['mask_ms_per_step']:>13.3f} {r['free_tok_s']:>11.1f} "
              f"{r['constrained_tok_s']:>18.1f} {r['ratio']:>6.2f} {r['cpu_ratio']:>10.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "constrained.json").write_text(json.dumps(
            {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": describe_machine(),
             "model": llm.model_name, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
