"""`mistralrs`: today's mistral.rs command line (`serve`, `run`, `bench`) on this engine.

    mistralrs serve -m Qwen/Qwen2.5-0.5B-Instruct --isq 4 -p 8080   # --isq 4 is Q4K, as in mistral.rs
    mistralrs serve -m TheBloke/Mistral-7B-Instruct-v0.2-GGUF -f mistral-7b-instruct-v0.2.Q4_K_M.gguf
    mistralrs run -m ./Qwen2.5-0.5B-Instruct        # chat in the terminal
    mistralrs run -i "What is the capital of France?"   # one prompt, then exit (default model)
    mistralrs bench --prompt-len 256 --gen-len 64  # prefill and decode tok/s of a GGUF model

Without -m, `serve`, `run` and `bench` use the default model (SmolLM2-135M-Instruct Q4_1).
Global options (--seed, -l/--log, --token-source, -v) go before or after the verb.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_args import add_global_flags, add_log_flag, positive_int, token_source
from ..errors import NotSupportedError
from . import run_model, run_parsed

PROG = "mistralrs"
# mistral.rs's `bench` defaults.
BENCH_PROMPT_LEN = 512
BENCH_GEN_LEN = 128
BENCH_ITERATIONS = 3


def _add_shared_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """mistral.rs's global options; after the verb, an unset one leaves the value before it alone."""
    def default(value: Any) -> dict[str, Any]:
        return {"default": value if top else argparse.SUPPRESS}

    parser.add_argument("--seed", type=int, **default(None), help="random seed for reproducible sampling")
    add_log_flag(parser, **default(None))
    parser.add_argument("-v", "--verbose", action="count", **default(0), help="debug logging")
    if top:
        parser.add_argument("--token-source", type=token_source, default="cache",
                            help="Hugging Face token: cache, none, env:VAR, literal:TOKEN or path:FILE (default cache)")


def _add_model_selection(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model selection (none: the default SmolLM2-135M-Instruct Q4_1 GGUF)")
    model.add_argument("-m", "--model-id", help="Hugging Face repo id or local model directory or file")
    model.add_argument("-f", "--quantized-file", "--quantized-filename", dest="quantized_file",
                       help="the GGUF/GGML file in -m (or a local file path on its own)")
    model.add_argument("--format", choices=("plain", "gguf", "ggml"),
                       help="model format (default: from -f's suffix, else detected)")
    model.add_argument("-t", "--tokenizer", help="a local tokenizer.json to use instead of the model's")
    model.add_argument("--tok-model-id", help="repo id or path to take a quantized model's tokenizer from")
    model.add_argument("-a", "--arch", help="architecture (read from the model; the flag is checked against it)")
    model.add_argument("--gqa", type=int, help="GGML models: query heads per KV head (default: from the tensors)")
    model.add_argument("--max-seq-len", type=positive_int, help="longest sequence to plan the KV cache for")
    model.add_argument("--max-batch-size", type=positive_int, help="(device-mapping hint; accepted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="today's mistral.rs command line (serve, run, bench) "
                                                             "on mistralrs-jax",
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_shared_options(parser, top=True)
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for verb, help_text in (("serve", "serve the model over an OpenAI-compatible HTTP API"),
                            ("run", "chat with the model in the terminal, or answer one prompt (-i)")):
        sub = verbs.add_parser(verb, help=help_text, description=help_text)
        _add_model_selection(sub)
        add_global_flags(sub, verbs=True)
        _add_shared_options(sub, top=False)
        for action in sub._actions:  # given before the verb, it must not be reset after it
            if action.dest == "token_source":
                action.default = argparse.SUPPRESS
        if verb == "run":
            sub.add_argument("-i", "--input", metavar="TEXT", help="answer this one prompt, then exit")
    bench = verbs.add_parser("bench", help="prompt-processing and generation speed of a GGUF model",
                             description="prefill and decode tokens per second of a GGUF model on this engine "
                                         "(benchmarks/bench_engine.py; `mistralrs-jax bench` has more)")
    bench.add_argument("-m", "--model-id", help="Hugging Face repo id, local directory or .gguf file")
    bench.add_argument("-f", "--quantized-file", "--quantized-filename", dest="quantized_file",
                       help="the .gguf file in -m")
    bench.add_argument("--prompt-len", type=positive_int, default=BENCH_PROMPT_LEN,
                       help=f"prompt tokens for the prefill measurement (default {BENCH_PROMPT_LEN})")
    bench.add_argument("--gen-len", type=int, default=BENCH_GEN_LEN,
                       help=f"generated tokens for the decode measurement (default {BENCH_GEN_LEN}; at least 2)")
    bench.add_argument("--iterations", type=positive_int, default=BENCH_ITERATIONS,
                       help=f"repetitions; the median is reported (default {BENCH_ITERATIONS})")
    bench.add_argument("--cpu-weights", choices=("f32", "quantized"), default="quantized",
                       help="on CPU: weight format (default quantized)")
    bench.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")
    bench.add_argument("--out", default="results/", help="folder for the JSON result (default results/)")
    _add_shared_options(bench, top=False)
    return parser


def server_args(args: argparse.Namespace) -> argparse.Namespace:
    """The `mistralrs serve/run` namespace as `mistralrs-server` would have parsed it."""
    model, file, fmt = args.model_id, args.quantized_file, args.format
    if file is not None and fmt is None:
        fmt = "ggml" if file.lower().endswith(".bin") else "gguf"
    fields: dict[str, Any] = {"interactive_mode": args.verb == "run", "tokenizer_json": args.tokenizer,
                              "tok_model_id": args.tok_model_id, "paged_attn": args.paged_attn}
    if file is not None and model is not None:
        fields.update(command=fmt, quantized_model_id=model, quantized_filename=file)
    elif file is not None or model is not None:
        fields.update(command="plain" if fmt == "plain" else "run", model_id=model or file)
    else:
        fields.update(command=None)
    return argparse.Namespace(**{**vars(args), **fields})


def run_bench(args: argparse.Namespace) -> int:
    from ..loading.hub import resolve_model_files

    resolved = resolve_model_files(args.model_id, args.quantized_file, args.token_source)
    if resolved.kind != "gguf":
        raise NotSupportedError(f"mistralrs bench measures GGUF models; {resolved.display_name} is a safetensors model "
                                "(serve it and use `mistralrs-jax bench serving --url ...` instead)")
    from benchmarks.bench_engine import main as bench_main

    return int(bench_main(["--model", resolved.gguf_path, "--pp", str(args.prompt_len), "--tg", str(args.gen_len),
                           "--reps", str(args.iterations), "--threads", str(args.threads), "--out", args.out,
                           "--cpu-weights", args.cpu_weights, "--engines", "ours"]) or 0)


def _handle(args: argparse.Namespace) -> int:
    if args.verb == "bench":
        return run_bench(args)
    return run_model(server_args(args), one_shot=getattr(args, "input", None))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_parsed(parser, parser.parse_args(argv), _handle)


if __name__ == "__main__":
    sys.exit(main())
