"""Scripted benchmark runs: `serving` (load an OpenAI-compatible server) and `pp-tg` (engine vs peers).

    mistralrs-jax bench serving --url http://127.0.0.1:1234 --concurrency 1,4,16
    mistralrs-jax bench pp-tg --pp 256 --tg 128 --reps 3      # flags go to benchmarks.bench_engine

Kept light to import: `mistralrs-jax` imports this module to build its parser on every run.
"""
from __future__ import annotations

import argparse
import importlib
import logging

from mistralrs_jax.errors import NotSupportedError

log = logging.getLogger(__name__)

PP_TG_MODULE = "benchmarks.bench_engine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import serving

    benches = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    serving_parser = benches.add_parser("serving", help="throughput and latency of an OpenAI-compatible server",
                                        description=serving.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
    serving.add_arguments(serving_parser)
    # pp-tg hands every argument to bench_engine's own parser, whose flags may change: '+' as the
    # prefix character keeps argparse here from reading its '--flags' (and '--help') itself.
    pp_tg = benches.add_parser("pp-tg", prefix_chars="+", add_help=False,
                               help="prompt-processing and generation tok/s: ours vs llama.cpp vs transformers "
                                    "(pass --help for its flags)")
    pp_tg.add_argument("bench_args", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serving":
        from .serving import run_from_args

        return run_from_args(args)
    if args.bench_command == "pp-tg":
        return run_pp_tg(args.bench_args)
    raise NotSupportedError(f"unknown benchmark {args.bench_command!r}; choose serving or pp-tg")


def run_pp_tg(argv: list[str]) -> int:
    try:
        module = importlib.import_module(PP_TG_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != PP_TG_MODULE:
            raise  # a dependency of the benchmark is missing: show the real cause
        module = None
    main = getattr(module, "main", None)
    if main is None:
        raise NotSupportedError(f"the pp/tg benchmark is not available in this build ({PP_TG_MODULE}.main is "
                                "missing); run the serving benchmark with `mistralrs-jax bench serving --url ...`")
    return int(main(list(argv)) or 0)
