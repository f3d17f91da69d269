"""`mistralrs-server` / `mistralrs-jax`: the command line of mistral.rs, wired to this engine.

Global flags come before the model subcommand, as in mistral.rs; the model's own flags
(--isq, --dtype, --cpu-weights, ...) may also follow it:

    mistralrs-server --port 1234 --log info gguf -m REPO_OR_DIR -f FILE.gguf
    mistralrs-server --port 8080 plain -m mistralai/Mistral-7B-Instruct-v0.3 --isq Q4K
    mistralrs-server -i                      # the default model (SmolLM2-135M-Instruct Q4_1)

Every mistral.rs flag and subcommand parses, the old per-architecture ones (`mistral`,
`mistral-gguf`, `x-lora-mistral`, ...) included. One this engine cannot honour yet stops
with a one-line error naming it; none is ignored silently.

This package is the top of the import graph: it loads the HTTP server, the TUI and the
benchmarks; nothing below imports it. `mistralrs` (today's mistral.rs verbs) is `verbs.py`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from ..cli_args import (DEFAULT_HOST, DEFAULT_MAX_SEQS, DEFAULT_PORT, DEFAULT_PREFIX_CACHE_N,  # noqa: F401
                        DEFAULT_SPECULATIVE_GAMMA, LEGACY_SUBCOMMANDS, MODEL_SUBCOMMANDS, XLORA_SUBCOMMANDS,
                        add_global_flags, add_model_subcommands)
from ..cli_kwargs import (UNSUPPORTED_SUBCOMMANDS, apply_environment, build_llm_kwargs,  # noqa: F401
                          canonical_command, check_supported, configure_logging, log_level_and_request_log)
from ..errors import MistralRsError, NotSupportedError

log = logging.getLogger(__name__)

# Tool subcommands: name -> its module's (add_arguments(parser), run(args) -> int).
TOOL_SUBCOMMANDS = ("tui", "bench")


def _tool_module(name: str) -> Any:
    if name == "tui":
        from tui import cli as module
    else:
        from benchmarks import cli as module
    return module


def _add_tool_subcommands(subparsers: argparse._SubParsersAction) -> None:
    for name in TOOL_SUBCOMMANDS:
        module = _tool_module(name)
        sub = subparsers.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        # `tool` survives a nested model subcommand overwriting `command` (see main()).
        sub.set_defaults(tool=name)
        module.add_arguments(sub)


def build_parser() -> argparse.ArgumentParser:
    invoked_as = os.path.basename(sys.argv[0]) if sys.argv else ""
    parser = argparse.ArgumentParser(
        prog=invoked_as if invoked_as == "mistralrs-jax" else "mistralrs-server",
        description="mistralrs-jax: an OpenAI-compatible LLM server on JAX, with the command line of "
                    "mistral.rs. Global flags go before the model subcommand; the model's own flags "
                    "(--isq, --dtype, --cpu-weights, ...) may also follow it.",
        epilog="examples:\n"
               "  mistralrs-server -i\n"
               "  mistralrs-server --port 8080 --log info gguf -m ./models -f model.Q4_K_M.gguf\n"
               "  mistralrs-server --port 8080 plain -m mistralai/Mistral-7B-Instruct-v0.3 --isq Q4K\n"
               "  mistralrs-server speculative -m TARGET --isq Q4K -d DRAFT --draft-isq Q4K -n 5\n"
               "  mistralrs-server --port 1234 mistral-gguf     # mistral.rs' old subcommands still work",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(parser)
    subparsers = add_model_subcommands(parser)
    _add_tool_subcommands(subparsers)
    return parser


# --------------------------------------------------------------------------- running


def _load_server() -> Callable[..., Any]:
    """`server.app.serve` (imported here, not at the top: --help must not import JAX)."""
    from server.app import serve

    return serve


def _check_arch(llm: Any, args: argparse.Namespace) -> None:
    wanted = getattr(args, "arch", None)
    found = getattr(getattr(llm, "model_config", None), "arch", None)
    if canonical_command(getattr(args, "command", None)) == "vision-plain":
        vision = getattr(llm, "vision", None)
        if vision is None:
            from ..models.vision import SUPPORTED_VISION_ARCHS

            raise NotSupportedError(f"vision-plain needs a vision model, but {llm.model_name} is a text model: serve "
                                    f"it with `plain` (vision architectures: {', '.join(SUPPORTED_VISION_ARCHS)})")
        found = vision.arch
    if wanted and found and wanted.replace("-", "").replace("_", "").lower() not in str(found).replace("_", "").lower():
        log.warning("--arch %s given, but the model's files say %s; using %s", wanted, found, found)


def run_model(args: argparse.Namespace, one_shot: str | None = None) -> int:
    """Load the selected model, then chat in the terminal (-i) or serve HTTP.

    one_shot: a single prompt to answer in the terminal instead (`mistralrs run -i TEXT`)."""
    kwargs = build_llm_kwargs(args)
    chat = args.interactive_mode or one_shot is not None
    serve = None if chat else _load_server()  # fail before a long load
    if serve is not None:  # answer once the smallest step shapes are compiled; the rest compile meanwhile
        kwargs.setdefault("warmup", "background")
    apply_environment(args)
    from .. import LLM

    llm = LLM(**kwargs)
    try:
        _check_arch(llm, args)
        if chat:
            import io

            from ..interactive import InteractiveChat

            stdin = sys.stdin if one_shot is None else io.StringIO(one_shot + "\n")
            return InteractiveChat(llm, args).run(stdin, sys.stdout)
        serve(llm, args)
        return 0
    finally:
        llm.shutdown()


def _run_tool(args: argparse.Namespace) -> int:
    return int(_tool_module(args.tool).run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = canonical_command(args.command)
    return run_parsed(parser, args, _run_tool if getattr(args, "tool", None) else run_model)


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace,
               handler: Callable[[argparse.Namespace], int]) -> int:
    """Set up logging, run `handler(args)`; a MistralRsError is one `prog: error:` line, exit 1."""
    try:
        level, args.request_log_file = log_level_and_request_log(args)
        configure_logging(level)
        return handler(args)
    except MistralRsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
