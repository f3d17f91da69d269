"""Quality of every ISQ type on a real model, like llama.cpp's quantization tables.

    python -m benchmarks.isq_quality [--model PATH] [--types Q4_0,Q4K,...] [--text FILE]
                                     [--tg 32] [--out results/]

The source model (default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF) is dequantized to
f32: that is the "unquantized" reference. Each ISQ type re-quantizes those f32 weights at
load (`mistralrs_jax.quant.isq.wrap_factory`), and for each the script reports, on a fixed
text (tests/data/english.txt unless --text):

- PPL: perplexity of the text, exp(mean negative log-likelihood of each next token);
- KL: mean over positions of KL(reference || quantized) of the next-token distributions,
  and "top-1": how often both pick the same most likely token (llama.cpp's "same top");
- MiB: bytes of the projection weights as held in memory (int8 codes + f32 scales/offsets;
  the embedding, norms and a tied lm_head stay f32 and are the same for every row);
- load s: the ISQ load time; tok/s: greedy batch-1 decode of --tg tokens after an 8-token
  prompt, through the real scheduler and runner, excluding the first step (compilation).

Rows with "file" are the source file's own blocks held as int8 (`cpu_weights="quantized"`).
On XLA:CPU every int8 row decodes slower than f32 (DESIGN.md: XLA's only fast CPU dot is
f32); the int8 form is for memory on CPU and for the Pallas kernel on GPU.
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


def decode_tokens_per_second(model, config, prompt: list[int], tg: int) -> float:
    """Greedy batch-1 decode through the scheduler and runner; the first decode step (compile) is not timed."""
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
    parser.add_argument("--out", default="results/", help="folder for the JSON result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

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
        tok_s = decode_tokens_per_second(model, config, prompt, args.tg) if args.tg > 1 else float("nan")
        row = {"type": label, "ppl": float(np.exp(nll.mean())), "kl": kl, "top1": top1,
               "projection_mib": projection_bytes(factory) / 2**20, "load_s": load_seconds,
               "decode_tok_s": tok_s, "formats": factory.summary() if isq_type else {cpu_weights: len(factory.linears)}}
        results.append(row)
        print(f"{label:>24}  PPL {row['ppl']:8.4f}  KL {kl:.5f}  top-1 {top1:6.1%}  "
              f"{row['projection_mib']:6.1f} MiB  load {load_seconds:5.1f} s  {tok_s:6.1f} tok/s  {row['formats']}",
              flush=True)

    print(f"\n{Path(model_path).name}: {len(tokens)} tokens of {Path(args.text).name}\n")
    print("| type | PPL | KL vs f32 | same top-1 | projections MiB | load s | decode tok/s | formats |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        formats = ", ".join(f"{k} x{v}" for k, v in row["formats"].items())
        print(f"| {row['type']} | {row['ppl']:.4f} | {row['kl']:.5f} | {row['top1']:.1%} | "
              f"{row['projection_mib']:.1f} | {row['load_s']:.1f} | {row['decode_tok_s']:.1f} | {formats} |")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"isq_quality-{stamp}.json"
    out.write_text(json.dumps({
        "benchmark": "isq_quality", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_path, "text": args.text, "tokens": len(tokens), "tg": args.tg,
        "machine": describe_machine(with_jax_backend=True) | {"load_average_1m": os.getloadavg()[0]},
        "rows": results,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
