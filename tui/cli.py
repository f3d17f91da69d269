"""A terminal dashboard and chat: watch the scheduler, KV cache, memory and throughput.

    mistralrs-jax tui --url http://127.0.0.1:1234     # attach to a running server
    mistralrs-jax tui                                  # start the default model here, then watch it
    mistralrs-jax --max-seqs 8 tui gguf -m DIR -f FILE.gguf

Kept light to import: `mistralrs-jax` imports this module to build its parser on every run.
It takes its flags from mistralrs_jax.cli_args, never from the mistralrs_jax.cli entry point.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from mistralrs_jax.errors import InvalidRequestError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mistralrs_jax.cli_args import add_model_subcommands

    parser.add_argument("--url", help="attach to the server at URL (e.g. http://127.0.0.1:1234) instead of "
                                      "starting a model in this process")
    parser.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                        help="how often to read /v1/status and /metrics (default 1)")
    parser.add_argument("--serve-port", type=int, default=0, metavar="PORT",
                        help="without --url: the loopback port for the in-process server (default: any free one)")
    parser.add_argument("--temperature", type=float, default=0.7, help="chat: initial temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="chat: initial top_p (default 0.95)")
    parser.add_argument("--max-tokens", type=int, default=256, help="chat: initial max_tokens (default 256)")
    add_model_subcommands(parser)


def run(args: argparse.Namespace) -> int:
    from tui.client import ChatSettings

    if args.poll_interval <= 0:
        raise InvalidRequestError("--poll-interval must be positive, e.g. 1", param="poll_interval")
    settings = ChatSettings(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    model_selected = args.command not in (None, "tui")
    if args.url:
        if model_selected:
            raise InvalidRequestError(f"--url attaches to a running server; the `{args.command}` model arguments "
                                      "start one in this process: give one or the other", param="url")
        return _run_dashboard(args.url, args, settings, memory_from_this_process=False)
    return _run_in_process(args, settings)


def _run_in_process(args: argparse.Namespace, settings) -> int:
    from mistralrs_jax import LLM
    from mistralrs_jax.cli_kwargs import apply_environment, build_llm_kwargs
    from server.app import create_app
    from server.serving import BackgroundServer

    kwargs = build_llm_kwargs(args)
    apply_environment(args)
    print("mistralrs-jax tui: loading the model and compiling (the dashboard opens when it is ready)...",
          file=sys.stderr, flush=True)
    llm = LLM(**kwargs)
    try:
        app = create_app(llm, api_key=args.api_key, truncate_sequence=bool(args.truncate_sequence),
                         default_seed=args.seed)
        server = BackgroundServer(app, host="127.0.0.1", port=args.serve_port).start()
        try:
            print(f"mistralrs-jax tui: serving {llm.model_name} on {server.url}", file=sys.stderr, flush=True)
            return _run_dashboard(server.url, args, settings, memory_from_this_process=True)
        finally:
            server.stop()
    finally:
        llm.shutdown()


def _run_dashboard(url: str, args: argparse.Namespace, settings, memory_from_this_process: bool) -> int:
    from tui.app import DashboardApp, LogBuffer

    buffer = LogBuffer()
    app = DashboardApp(url, api_key=args.api_key, poll_interval=args.poll_interval,
                       memory_from_this_process=memory_from_this_process, chat_settings=settings, log_buffer=buffer)
    with logging_into(buffer):
        app.run()
    return int(app.return_code or 0)


@contextlib.contextmanager
def logging_into(handler: logging.Handler) -> Iterator[None]:
    """While the dashboard owns the terminal, log records go to `handler` instead of stderr."""
    root = logging.getLogger()
    terminal = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)]
    httpx_logger = logging.getLogger("httpx")
    httpx_level = httpx_logger.level
    for h in terminal:
        root.removeHandler(h)
    root.addHandler(handler)
    httpx_logger.setLevel(logging.WARNING)  # one INFO line per poll is noise
    try:
        yield
    finally:
        root.removeHandler(handler)
        for h in terminal:
            root.addHandler(h)
        httpx_logger.setLevel(httpx_level)
