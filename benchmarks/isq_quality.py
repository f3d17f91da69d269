"""Quality of every ISQ type on a real model, like llama.cpp's quantization tables.

    python -m benchmarks.isq_quality [--model PATH] [--types Q4_0,Q4K,...] [--text FILE]
                                     [--tg 32] [--reps 1] [--threads N] [--out results/]

The source model (default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF) is dequantized to
f32: that is the "unquantized" reference. Each ISQ type re-quantizes those f32 weights at
load (`mistralrs_jax.quant.isq.wrap_factory`), and for each the script reports, on a fixed
text (tests/data/english.txt unless --text):

- PPL: perplexity of the text, exp(mean negative log-likelihood of each next token);
- KL: mean over positions of KL(reference || quantized) of the next-token distributions,
  and "top-1": how often both pick the same most likely token (llama.cpp's "same top");
- MiB and bits/weight: the projection weights as held in memory (packed blocks at the format's
  own bits: ISQ writes the same layouts llama.cpp's quantizers do, HQQ4/HQQ8 4/8-bit codes with
  an f16 scale and zero per 64 weights); the token embedding, the norms and a tied lm_head are held
  as in the source and are the same for every row;
- formats: what each projection actually holds, with the format's bits per weight. Rows that
  fill no 256-value K-quant super-block (SmolLM2's 576-wide inputs) fall back per tensor as
  llama.cpp's quantizer does (quant/isq.py FALLBACK_TYPES);
- load s: the ISQ load time (quantizing included); tok/s: greedy batch-1 decode of --tg tokens
  after an 8-token prompt, through the real scheduler and runner, excluding the first steps
  (compilation); the median of --reps runs, and its ratio to the f32 row.

Rows with "file" are the source file's own blocks, held packed (the default `cpu_weights`).
Packed rows run the CPU FFI kernel where it is built (quant/cpu_kernel), the XLA reference
otherwise. Timings mean something only on a quiet machine: the load average is printed and
recorded; `--threads` pins the process to that many CPUs, as bench_engine does.

    python -m benchmarks.isq_quality --threads 2 --reps 3 --out results/   # the quiet rerun
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO / "tests" / "data" / "english.txt"


def build(gguf, config, factory):
    from mistralrs_jax.models.registry import build_model
    from mistralrs_jax.loading.gguf_weights import GGUFWeights

    return build_model(config, GGUFWeights(gguf, config, factory))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def projection_bytes(factory) -> int:
    return sum(linear.nbytes for linear in factory.linears.values())


def projection_weights(factory) -> int:
    return sum(linear.in_features * linear.out_features for linear in factory.linears.values())


def held_formats(factory) -> dict[str, int]:
    """How many projections are held in each format (a packed type, or the dense dtype)."""
    counts: dict[str, int] = {}
    for linear in factory.linears.values():
        kind = linear.qtype if linear.quantized else str(linear.weight[...].dtype)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def format_bits(kind: str) -> float:
    """Bits per weight of a packed format, or of a dense dtype."""
    from mistralrs_jax.quant.packed import block_geometry

    if kind.startswith(("float", "bfloat")):
        return float(np.dtype(kind).itemsize * 8) if kind != "bfloat16" else 16.0
    block_elems, type_size = block_geometry(kind)
    return 8.0 * type_size / block_elems


def decode_tokens_per_second(model, config, prompt: list[int], tg: int, reps: int = 1) -> float:
    """Greedy batch-1 decode through the scheduler and runner, the median of `reps` runs; the
    first run compiles and is not timed."""
    runs = [decode_run(model, config, prompt, tg) for _ in range(reps + 1)]
    return float(np.median(runs[1:]))


def decode_run(model, config, prompt: list[int], tg: int) -> float:
    """One greedy batch-1 decode; tok/s over the steps after the first decode step."""
    from mistralrs_jax.engine.block_manager import BlockManager
    from mistralrs_jax.engine.runner import ModelRunner
    from mistralrs_jax.engine.scheduler import Scheduler
    from mistralrs_jax.engine.sequence import Sequence
    from mistralrs_jax.sampling_params import SamplingParams

    max_len = len(prompt) + tg + 16
    runner = ModelRunner(model, config, num_blocks=max_len // 16 + 2, block_size=16, max_model_len=max_len,
                         max_num_seqs=1, max_num_batched_tokens=16, token_buckets=[1, 16], seq_buckets=[1])
    scheduler = Scheduler(BlockManager(runner.num_blocks, 16, enable_prefix_caching=False), max_num_seqs=1,
                          max_num_batched_tokens=16, max_model_len=max_len)
    seq = Sequence("bench", prompt, SamplingParams(temperature=0.0, max_tokens=tg, ignore_eos=True))
    scheduler.add(seq)
    step_times = []
    while scheduler.has_unfinished():
        start = time.perf_counter()
        output = scheduler.schedule()
        result = runner.execute(output.scheduled)
        sampled = {s.seq_id: result.tokens(row) for row, (s, _) in enumerate(output.scheduled)}
        for s, _ in scheduler.update_after_step(output, sampled):
            if s.num_output_tokens >= tg and not s.is_finished:
                scheduler.finish(s, "length")
        step_times.append(time.perf_counter() - start)
    decode = step_times[2:]  # step 0: prefill (+compile), step 1: first decode step (+compile)
    return len(decode) / sum(decode) if decode else float("nan")


def main(argv: list[str] | None = None) -> int:
    from mistralrs_jax.quant.isq import ISQ_TYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--types", default=",".join(ISQ_TYPES), help="comma-separated ISQ types")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="text to score (default tests/data/english.txt)")
    parser.add_argument("--tg", type=int, default=32, help="tokens for the decode speed (0: skip it)")
    parser.add_argument("--reps", type=int, default=1, help="timed decode runs per row (median)")
    parser.add_argument("--threads", type=int, default=0, help="pin the process to this many CPUs (0: all)")
    parser.add_argument("--out", default="results/", help="folder for the JSON result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        from benchmarks.bench_engine import pin_threads

        pin_threads(args.threads)  # before JAX creates its thread pools
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * len(os.sched_getaffinity(0)):
        print(f"warning: the load average is {load_before:.1f}; load s and tok/s from a busy machine are rough",
              flush=True)

    from mistralrs_jax import default_model_path
    from mistralrs_jax.models.model_config import config_from_gguf
    from mistralrs_jax.engine.runner import ModelRunner
    from mistralrs_jax.loading.gguf import GGUFFile
    from mistralrs_jax.loading.tokenizer import Tokenizer
    from mistralrs_jax.loading.gguf_weights import make_linear_factory
    from mistralrs_jax.quant.isq import normalize_isq_type, wrap_factory

    model_path = os.path.abspath(args.model) if args.model else default_model_path()
    gguf = GGUFFile(model_path)
    config = config_from_gguf(gguf.metadata, model_path)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    tokens = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=True)
    prompt = tokens[:8]
    targets = np.asarray(tokens[1:])

    def score(model) -> np.ndarray:
        runner = ModelRunner(model, config, num_blocks=4, block_size=16, max_model_len=2 * len(tokens) + 32,
                             max_num_seqs=1, max_num_batched_tokens=16)
        return log_softmax(runner.score(tokens)[:-1])

    file_type = gguf.tensor("blk.0.ffn_down.weight").qtype
    rows = [("f32 (reference)", "f32", None), (f"file {file_type} (as stored)", "quantized", None)]
    rows += [(normalize_isq_type(t), "f32", normalize_isq_type(t)) for t in args.types.split(",") if t.strip()]
    reference = None
    results = []
    for label, cpu_weights, isq_type in rows:
        start = time.perf_counter()
        factory = wrap_factory(make_linear_factory(cpu_weights), isq_type, progress=lambda name, kind: None)
        model = build(gguf, config, factory)
        load_seconds = time.perf_counter() - start
        logprobs = score(model)
        if reference is None:
            reference = logprobs
        nll = -logprobs[np.arange(len(targets)), targets]
        p_ref = np.exp(reference)
        kl = float(np.mean(np.sum(p_ref * (reference - logprobs), axis=-1)))
        top1 = float(np.mean(reference.argmax(-1) == logprobs.argmax(-1)))
        tok_s = decode_tokens_per_second(model, config, prompt, args.tg, args.reps) if args.tg > 1 else float("nan")
        formats = held_formats(factory)
        row = {"type": label, "ppl": float(np.exp(nll.mean())), "kl": kl, "top1": top1,
               "projection_mib": projection_bytes(factory) / 2**20,
               "bits_per_weight": 8.0 * projection_bytes(factory) / projection_weights(factory),
               "load_s": load_seconds, "decode_tok_s": tok_s, "formats": formats,
               "format_bits": {kind: format_bits(kind) for kind in formats}}
        results.append(row)
        print(f"{label:>24}  PPL {row['ppl']:8.4f}  KL {kl:.5f}  top-1 {top1:6.1%}  "
              f"{row['projection_mib']:6.1f} MiB  {row['bits_per_weight']:5.2f} b/w  load {load_seconds:5.1f} s  "
              f"{tok_s:6.1f} tok/s  {formats}", flush=True)
        del model, factory

    load_after = os.getloadavg()[0]
    print(f"\n{Path(model_path).name}: {len(tokens)} tokens of {Path(args.text).name}; load average "
          f"{load_before:.1f} at the start, {load_after:.1f} at the end\n")
    print("| type | PPL | KL vs f32 | same top-1 | projections MiB | bits/weight | load s | decode tok/s | vs f32 | "
          "formats (bits/weight) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f32_speed = results[0]["decode_tok_s"]
    for row in results:
        formats = ", ".join(f"{k} x{v} ({row['format_bits'][k]:g})" for k, v in row["formats"].items())
        print(f"| {row['type']} | {row['ppl']:.4f} | {row['kl']:.5f} | {row['top1']:.1%} | "
              f"{row['projection_mib']:.1f} | {row['bits_per_weight']:.2f} | {row['load_s']:.1f} | "
              f"{row['decode_tok_s']:.1f} | {row['decode_tok_s'] / f32_speed:.2f}x | {formats} |")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"isq_quality-{stamp}.json"
    out.write_text(json.dumps({
        "benchmark": "isq_quality", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_path, "text": args.text, "tokens": len(tokens), "tg": args.tg,
        "reps": args.reps, "machine": describe_machine(with_jax_backend=True)
        | {"load_average_1m_at_start": load_before, "load_average_1m_at_end": load_after},
        "rows": results,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
