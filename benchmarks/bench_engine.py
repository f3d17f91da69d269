"""Prefill and batch-1 decode speed of the engine next to llama.cpp and transformers, in one run.

    python -m benchmarks.bench_engine [--model PATH] [--threads 2] [--pp 256] [--tg 128]
                                      [--reps 3] [--out results/]

Every engine reads the same GGUF file and gets the same prompt token ids, and the whole
process is pinned to ``--threads`` CPUs before JAX or torch start their thread pools.

How each row is measured (median over ``--reps``, after one untimed warm-up):

- ``mistralrs-jax``: ``LLM.generate`` with ``ignore_eos``. Prefill is a ``max_tokens=1`` run
  of a pp-token prompt (prefill plus sampling the first token). A ``max_tokens=tg`` run is
  that prefill plus tg-1 decode steps, so decode tok/s = (tg-1) / (T_tg - T_1). The notes add
  the jitted decode step alone (median of 50, at position pp + tg/2) next to that per-token time. Every
  timed run gets a fresh random prompt, so the prefix cache cannot skip the prefill.
- ``llama.cpp (python)``: llama-cpp-python's ``Llama.eval`` on the prompt, then tg single
  tokens; times from llama.cpp's own perf counters (``llama_perf_context``), which is what
  ``llama-bench`` reports too, minus the Python call overhead.
- ``llama-bench``: the llama.cpp binary, if one is on PATH (or given with ``--llama-bench``).
- ``transformers f32/bf16``: ``model.generate`` greedy on the GGUF dequantized by
  transformers, timed exactly like ours (T_1 and T_tg).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.machine import describe_machine, package_version

logger = logging.getLogger(__name__)

NOT_INSTALLED = "not installed"
PEERS_HINT = "pip install -e '.[peers]'"


@dataclasses.dataclass
class Row:
    engine: str
    status: str = "ok"  # "ok" | "not installed" | "error: ..."
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    prefill_runs: list[float] = dataclasses.field(default_factory=list)
    decode_runs: list[float] = dataclasses.field(default_factory=list)
    notes: str = ""
    details: dict = dataclasses.field(default_factory=dict)  # JSON only: settings, engine metrics

    def finish(self) -> "Row":
        if self.prefill_runs:
            self.prefill_tok_s = statistics.median(self.prefill_runs)
        if self.decode_runs:
            self.decode_tok_s = statistics.median(self.decode_runs)
        return self


@dataclasses.dataclass
class Workload:
    model_path: str
    threads: int
    pp: int
    tg: int
    reps: int
    vocab_size: int
    cpu_weights: str = "quantized"
    seed: int = 0

    def prompts(self, count: int) -> list[list[int]]:
        """``count`` random pp-token prompts with distinct first tokens (no shared prefix to cache).

        Ids below 1000 are left out: small ids are where tokenizers keep their special tokens.
        """
        rng = np.random.default_rng(self.seed)
        first_tokens = rng.choice(np.arange(1000, self.vocab_size), size=count, replace=False)
        prompts = []
        for first in first_tokens:
            rest = rng.integers(1000, self.vocab_size, size=self.pp - 1)
            prompts.append([int(first)] + [int(t) for t in rest])
        return prompts


# --------------------------------------------------------------------------- machine


def pin_threads(threads: int) -> None:
    """Restrict this process to ``threads`` CPUs; XLA and torch size their pools from the affinity."""
    available = sorted(os.sched_getaffinity(0))
    if threads < len(available):
        os.sched_setaffinity(0, available[:threads])
    elif threads > len(available):
        logger.warning("--threads %d is more than the %d CPUs available to this process", threads, len(available))


def machine_description(threads: int) -> dict:
    """benchmarks.machine's description with the JAX backend (this process runs the engine)."""
    description = describe_machine(with_jax_backend=True)
    description.update(load_average_1m=os.getloadavg()[0], threads=threads,
                       cpus_used=sorted(os.sched_getaffinity(0)))
    return description


# --------------------------------------------------------------------------- engines


def bench_ours(work: Workload) -> Row:
    from mistralrs_jax import LLM, SamplingParams

    row = Row("mistralrs-jax")
    llm = LLM(model=work.model_path, cpu_weights=work.cpu_weights)
    try:
        prompts = iter(work.prompts(2 * work.reps + 2))

        def timed(max_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            start = time.perf_counter()
            output = llm.generate(next(prompts), params)[0].outputs[0]
            elapsed = time.perf_counter() - start
            if len(output.token_ids) != max_tokens:
                raise RuntimeError(f"asked for {max_tokens} tokens, got {len(output.token_ids)}")
            return elapsed

        timed(1), timed(work.tg)  # warm-up: first touches of memory, any lazy compile
        for _ in range(work.reps):
            t_first = timed(1)
            t_all = timed(work.tg)
            row.prefill_runs.append(work.pp / t_first)
            row.decode_runs.append((work.tg - 1) / (t_all - t_first))
        step_ms = _decode_step_ms(llm.runner, work.pp + work.tg // 2)
        llm.reset_prefix_cache()  # the timed steps wrote into blocks a cached prefix may name
        row.details["decode_step_ms"] = step_ms
        per_token_ms = 1e3 / statistics.median(row.decode_runs)
        row.notes = (f"cpu_weights={work.cpu_weights}; the jitted decode step alone {step_ms:.2f} ms of "
                     f"{per_token_ms:.2f} ms a token")
        engine_config = getattr(llm, "engine_config", None)
        if dataclasses.is_dataclass(engine_config):
            row.details["engine_config"] = dataclasses.asdict(engine_config)
        row.details["metrics"] = llm.metrics()
    finally:
        llm.shutdown()
    return row.finish()


def _decode_step_ms(runner, position: int, reps: int = 50) -> float:
    """Median ms of the jitted model step alone (no sampling, no Python around it) for one
    sequence decoding one token at `position`: what the engine's host-side work adds to a decode
    token is the rest of its time. The step writes one KV slot through a made-up block table (no
    sequence runs meanwhile; the caller resets the prefix cache afterwards)."""
    import jax

    bs = runner.block_size
    table = list(range(1, 1 + min(runner.num_blocks - 1, -(-(position + 1) // bs))))
    position = min(position, len(table) * bs - 1)
    inputs = jax.device_put(runner.build_metadata([([0], position, table)], *runner.padded_shape(1, 1)))
    times = []
    for i in range(reps + 3):
        start = time.perf_counter()
        logits, runner.kv_caches = runner._step_fn(runner.state_leaves, runner.kv_caches, *inputs)
        logits.block_until_ready()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_llamacpp_python(work: Workload) -> Row:
    row = Row("llama.cpp (python)")
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except (ImportError, OSError):
        row.status = NOT_INSTALLED
        return row
    model = llama_cpp.Llama(
        model_path=work.model_path,
        n_ctx=work.pp + work.tg + 16,
        n_batch=max(512, work.pp),
        n_threads=work.threads,
        n_threads_batch=work.threads,
        logits_all=False,
        verbose=False,
    )
    try:
        prompts = work.prompts(work.reps + 1)
        wall_prefill, wall_decode = [], []
        for rep, prompt in enumerate(prompts):
            # Decode input: any token ids do (no sampling is timed, as in llama-bench).
            decode_tokens = [prompt[i % len(prompt)] for i in range(work.tg)]
            model.reset()
            llama_cpp.llama_perf_context_reset(model.ctx)
            # llama.cpp books a decode into its counters only at a synchronize, and eval() without
            # logits_all never reads the logits, so synchronize after every call (as llama-bench does).
            start = time.perf_counter()
            model.eval(prompt)
            llama_cpp.llama_synchronize(model.ctx)
            prefilled = time.perf_counter()
            for token in decode_tokens:
                model.eval([token])
                llama_cpp.llama_synchronize(model.ctx)
            decoded = time.perf_counter()
            perf = llama_cpp.llama_perf_context(model.ctx)
            if rep == 0:
                continue  # warm-up
            if perf.n_p_eval != work.pp or perf.n_eval != work.tg:
                raise RuntimeError(
                    f"llama.cpp counted {perf.n_p_eval} prompt and {perf.n_eval} decode tokens, "
                    f"expected {work.pp} and {work.tg}"
                )
            row.prefill_runs.append(perf.n_p_eval / (perf.t_p_eval_ms / 1e3))
            row.decode_runs.append(perf.n_eval / (perf.t_eval_ms / 1e3))
            wall_prefill.append(work.pp / (prefilled - start))
            wall_decode.append(work.tg / (decoded - prefilled))
        row.notes = (
            f"llama-cpp-python {package_version('llama-cpp-python')}; wall clock incl. Python: "
            f"prefill {statistics.median(wall_prefill):.1f}, decode {statistics.median(wall_decode):.1f} tok/s"
        )
    finally:
        model.close()
    return row.finish()


def bench_llama_bench(work: Workload, binary: str | None) -> Row:
    row = Row("llama-bench")
    binary = binary or shutil.which("llama-bench")
    if binary is None:
        row.status = NOT_INSTALLED + " (no llama-bench on PATH; pass --llama-bench PATH)"
        return row
    command = [
        binary, "-m", work.model_path, "-t", str(work.threads),
        "-p", str(work.pp), "-n", str(work.tg), "-r", str(work.reps), "-o", "json",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    tests = json.loads(completed.stdout)
    for test in tests:
        if test.get("n_prompt", 0) > 0 and test.get("n_gen", 0) == 0:
            row.prefill_runs = [float(v) for v in test.get("samples_ts") or [test["avg_ts"]]]
        elif test.get("n_gen", 0) > 0 and test.get("n_prompt", 0) == 0:
            row.decode_runs = [float(v) for v in test.get("samples_ts") or [test["avg_ts"]]]
    if not row.prefill_runs or not row.decode_runs:
        raise RuntimeError(f"llama-bench printed no pp{work.pp}/tg{work.tg} results: {completed.stdout[:500]}")
    row.notes = f"{binary}, build {tests[0].get('build_commit', '?')}"
    return row.finish()


def bench_transformers(work: Workload, dtype_name: str) -> Row:
    row = Row(f"transformers {dtype_name}")
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
        importlib.import_module("accelerate")  # transformers reads GGUF only with accelerate
    except ImportError:
        row.status = NOT_INSTALLED
        return row
    torch.set_num_threads(work.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    # Dense weights in `dtype`: transformers >= 5 could otherwise keep the blocks packed for ggml kernels.
    extra = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(work.model_path), gguf_file=os.path.basename(work.model_path), dtype=dtype, **extra
    )
    model.eval()
    prompts = iter(work.prompts(2 * work.reps + 2))

    def timed(max_tokens: int) -> float:
        input_ids = torch.tensor([next(prompts)], dtype=torch.long)
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        elapsed = time.perf_counter() - start
        assert output.shape[1] == input_ids.shape[1] + max_tokens
        return elapsed

    timed(1), timed(work.tg)
    for _ in range(work.reps):
        t_first = timed(1)
        t_all = timed(work.tg)
        row.prefill_runs.append(work.pp / t_first)
        row.decode_runs.append((work.tg - 1) / (t_all - t_first))
    row.notes = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return row.finish()


def run_row(name: str, bench: Callable[[], Row]) -> Row:
    print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
    try:
        return bench()
    except Exception as exc:  # one failing engine must not hide the others' numbers
        logger.exception("%s failed", name)
        return Row(name, status=f"error: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- report


def format_table(rows: list[Row], baseline: Row | None) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def ratio(value: float | None, reference: float | None) -> str:
        return "-" if value is None or not reference else f"{value / reference:.2f}x"

    header = ("engine", "prefill tok/s", "decode tok/s", "prefill vs llama.cpp", "decode vs llama.cpp", "status")
    lines = [header]
    for row in rows:
        lines.append((
            row.engine,
            number(row.prefill_tok_s),
            number(row.decode_tok_s),
            ratio(row.prefill_tok_s, baseline and baseline.prefill_tok_s),
            ratio(row.decode_tok_s, baseline and baseline.decode_tok_s),
            row.status,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def default_model() -> str:
    from mistralrs_jax import default_model_path

    return default_model_path()


def read_vocab_size(model_path: str) -> int:
    import gguf

    reader = gguf.GGUFReader(model_path)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(max(tensor.shape))
    raise ValueError(f"{model_path} has no token_embd.weight tensor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=256, help="prompt tokens for the prefill measurement")
    parser.add_argument("--tg", type=int, default=128, help="generated tokens for the decode measurement")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="results/", help="folder for the JSON result")
    parser.add_argument(
        "--cpu-weights", choices=("f32", "quantized"), default="quantized", help="our engine's CPU weight format"
    )
    parser.add_argument("--llama-bench", help="path of a llama-bench binary (default: search PATH)")
    parser.add_argument(
        "--engines",
        default="ours,llama.cpp,llama-bench,transformers-f32,transformers-bf16",
        help="comma-separated subset of the default list",
    )
    args = parser.parse_args(argv)
    if args.pp < 1 or args.tg < 2 or args.reps < 1:
        parser.error("--pp must be >= 1, --tg >= 2 (decode is timed over tg-1 steps), --reps >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    pin_threads(args.threads)  # before JAX or torch create their thread pools
    model_path = os.path.abspath(args.model) if args.model else default_model()
    if not os.path.isfile(model_path):
        parser.error(f"--model {model_path} is not a file")
    work = Workload(
        model_path, args.threads, args.pp, args.tg, args.reps, read_vocab_size(model_path), args.cpu_weights
    )

    engines = {
        "ours": lambda: bench_ours(work),
        "llama.cpp": lambda: bench_llamacpp_python(work),
        "llama-bench": lambda: bench_llama_bench(work, args.llama_bench),
        "transformers-f32": lambda: bench_transformers(work, "f32"),
        "transformers-bf16": lambda: bench_transformers(work, "bf16"),
    }
    selected = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in selected if name not in engines]
    if unknown:
        parser.error(f"unknown --engines {unknown}; choose from {list(engines)}")
    load_before = os.getloadavg()[0]
    rows = [run_row(name, engines[name]) for name in selected]

    baseline = next(
        (row for row in rows if row.engine in ("llama.cpp (python)", "llama-bench") and row.status == "ok"), None
    )
    table = format_table(rows, baseline)
    print(f"\n{Path(model_path).name}: pp{args.pp} / tg{args.tg}, {args.threads} threads, median of {args.reps}")
    print(table)
    if load_before > 1.0:
        # llama.cpp's spin-waiting threads lose 10x and more when they share cores with other work.
        print(f"warning: the load average was {load_before:.1f} when the run started; numbers from a busy machine "
              "are not comparable (llama.cpp suffers most)")
    if any(row.status == NOT_INSTALLED for row in rows):
        print(f"(peers not installed: {PEERS_HINT})")

    result = {
        "benchmark": "bench_engine",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_path,
        "workload": {
            "pp": args.pp, "tg": args.tg, "reps": args.reps, "threads": args.threads, "cpu_weights": args.cpu_weights,
        },
        "machine": machine_description(args.threads) | {"load_average_1m_at_start": load_before},
        "baseline": baseline.engine if baseline else None,
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"bench_engine-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out_file.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out_file}")
    ours = next((row for row in rows if row.engine == "mistralrs-jax"), None)
    return 1 if ours is not None and ours.status != "ok" else 0


if __name__ == "__main__":
    sys.exit(main())
