"""From parsed mistral.rs command-line arguments (mistralrs_jax.cli_args) to `LLM(...)`.

Shared by the entry points (mistralrs_jax.cli, tui.cli); kept light to import.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .cli_args import SUBCOMMAND_ALIASES, XLORA_SUBCOMMANDS
from .errors import InvalidRequestError, NotSupportedError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}

# Subcommands mistral.rs has whose feature this engine lacks: name -> why / what to do instead.
UNSUPPORTED_SUBCOMMANDS = {
    "toml": "TOML model selectors are not supported yet in mistralrs-jax; use the `plain` or `gguf` subcommand",
    "diffusion": "diffusion (image generation) models are not supported by mistralrs-jax",
    "speech": "speech generation models are not supported by mistralrs-jax",
}

# Flags mistral.rs has that select a feature this engine lacks: dest -> message.
# Only a flag the user actually set triggers its message.
UNSUPPORTED_FLAGS = {
    "no_kv_cache": "--no-kv-cache is not supported: mistralrs-jax always uses its (paged) KV cache",
    "num_device_layers": "-n/--num-device-layers (layer device mapping) is not supported: mistralrs-jax splits a "
                         "model over several devices with -tp/--tensor-parallel-size N instead",
    "enable_search": "--enable-search (web search) is not supported by mistralrs-jax",
    "search_bert_model": "--search-bert-model (web search) is not supported by mistralrs-jax",
    "search_embedding_model": "--search-embedding-model (web search) is not supported by mistralrs-jax",
    "thinking": "--thinking/--enable-thinking is not supported yet in mistralrs-jax",
    "mcp_port": "--mcp-port (MCP server) is not supported by mistralrs-jax",
    "mcp_config": "--mcp-config (MCP client) is not supported by mistralrs-jax",
    "topology": "--topology (device topology files) is not supported by mistralrs-jax",
    "organization": "--organization (ISQ organization) is not supported yet in mistralrs-jax",
    "write_uqff": "--write-uqff (UQFF files) is not supported by mistralrs-jax",
    "from_uqff": "--from-uqff (UQFF files) is not supported by mistralrs-jax",
    "imatrix": "--imatrix is not supported yet in mistralrs-jax",
    "calibration_file": "--calibration-file is not supported yet in mistralrs-jax",
    "max_edge": "--max-edge (image resizing) is not supported yet in mistralrs-jax",
}


def canonical_command(command: str | None) -> str | None:
    for name, aliases in SUBCOMMAND_ALIASES.items():
        if command in aliases:
            return name
    return command


def log_level_and_request_log(args: argparse.Namespace) -> tuple[int, str | None]:
    """(logging level, request log file) from `--log` and `--request-logging-file`.

    `--log` as in mistral.rs: a file every request and response is appended to; a level
    name (info, debug, ...) sets the log level instead."""
    level, request_log = logging.INFO, getattr(args, "request_logging_file", None)
    log = getattr(args, "log", None)
    if log is not None:
        if log.lower() in LOG_LEVELS:
            level = LOG_LEVELS[log.lower()]
        elif request_log is None:
            request_log = log
        else:
            raise InvalidRequestError(
                f"--log {log!r} is not a level ({', '.join(LOG_LEVELS)}) and --request-logging-file "
                "already names the request log", param="log")
    if getattr(args, "verbose", 0):
        level = logging.DEBUG
    return level, request_log


def check_supported(args: argparse.Namespace) -> None:
    """Raise NotSupportedError for a subcommand or a set flag this engine cannot honour."""
    command = canonical_command(args.command)
    if command in UNSUPPORTED_SUBCOMMANDS:
        raise NotSupportedError(UNSUPPORTED_SUBCOMMANDS[command])
    for dest, message in UNSUPPORTED_FLAGS.items():
        if getattr(args, dest, None) not in (None, False):
            raise NotSupportedError(message)
    if getattr(args, "pa_cache_type", "auto") != "auto":
        raise NotSupportedError(f"--pa-cache-type {args.pa_cache_type} is not supported yet; only auto")
    if getattr(args, "draft_isq", None) and command != "speculative":
        raise InvalidRequestError("--draft-isq quantizes the draft model of the `speculative` subcommand; "
                                  f"{'this command has' if command else 'the default model has'} no draft model",
                                  param="draft_isq")


def _xlora_kwargs(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Base model and X-LoRA model of `x-lora` / `x-lora-gguf` / `x-lora-ggml` (loading/adapters/xlora.py).

    `x-lora` without -m takes the base model from the ordering file's or the X-LoRA config's
    base model id, as mistral.rs does."""
    kwargs: dict[str, Any] = {"xlora_model_id": args.xlora_model_id, "xlora_order": args.order,
                              "tgt_non_granular_index": args.tgt_non_granular_index}
    if command == "x-lora-gguf":
        kwargs.update(model=args.quantized_model_id, gguf_file=args.quantized_filename, tokenizer=args.tok_model_id)
    elif command == "x-lora-ggml":
        kwargs.update(model=args.quantized_model_id, gguf_file=args.quantized_filename,
                      tokenizer=args.tokenizer_json or args.tok_model_id, gqa=getattr(args, "gqa", None))
    else:
        from .loading.adapters.xlora import xlora_base_model

        model = args.model_id or xlora_base_model(args.xlora_model_id, args.order, args.token_source)
        kwargs.update(model=model, tokenizer=args.tokenizer_json)
    return kwargs


def _lora_kwargs(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Model and adapters of `lora` / `lora-gguf` (loading/adapters/sources.py reads the ordering file).

    `lora` without -m takes the base model from the ordering file's base_model_id, else from
    the first adapter's adapter_config.json, as mistral.rs does."""
    from .loading.adapters.sources import adapters_from_cli, base_model_of

    specs, weights, ordering_base = adapters_from_cli(args.adapters_model_id, args.order)
    kwargs: dict[str, Any] = {"lora_adapters": specs, "lora_weights": weights}
    if command == "lora-gguf":
        kwargs.update(model=args.quantized_model_id, gguf_file=args.quantized_filename, tokenizer=args.tok_model_id)
    elif command == "lora-ggml":
        kwargs.update(model=args.quantized_model_id, gguf_file=args.quantized_filename,
                      tokenizer=args.tokenizer_json or args.tok_model_id, gqa=args.gqa)
    else:
        model = args.model_id or ordering_base or base_model_of(specs[0], args.token_source)
        kwargs.update(model=model, tokenizer=args.tokenizer_json)
    return kwargs


def build_llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `LLM(...)` from parsed command-line args (shared by server and TUI)."""
    check_supported(args)
    command = canonical_command(args.command)
    if command in ("tui", "bench"):  # a tool run without a nested model subcommand: the default model
        command = None
    kwargs: dict[str, Any] = {
        "model": None,
        "gguf_file": None,
        "tokenizer": None,
        "token_source": args.token_source,
        "revision": args.revision,
        "dtype": args.dtype,
        "max_seqs": args.max_seqs,
        "tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),
        "data_parallel_size": getattr(args, "data_parallel_size", 1),
        "prefix_cache_n": args.prefix_cache_n,
        "no_paged_attn": bool(args.no_paged_attn or getattr(args, "paged_attn", None) == "off"),
        "cpu_weights": args.cpu_weights,
        # mistral.rs: the explicit .jinja template overrides every other one.
        "chat_template": args.jinja_explicit or args.chat_template,
        "isq": args.isq,
        "isq_cache": args.isq_cache,
    }
    if getattr(args, "lora_mode", "merged") == "dynamic":
        kwargs.update(lora_mode="dynamic", max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
    if command == "gguf":
        kwargs.update(model=args.quantized_model_id, gguf_file=args.quantized_filename, tokenizer=args.tok_model_id)
    elif command == "ggml":
        kwargs.update(model=args.quantized_model_id, gguf_file=args.quantized_filename,
                      tokenizer=args.tokenizer_json or args.tok_model_id, gqa=args.gqa)
    elif command in ("plain", "run", "vision-plain"):
        if command == "vision-plain" and args.arch:
            from .models.vision import check_vision_arch

            check_vision_arch(args.arch)  # an unsupported -a fails before any download or load
        kwargs.update(model=args.model_id, tokenizer=args.tokenizer_json)
    elif command in ("lora", "lora-gguf", "lora-ggml"):
        kwargs.update(_lora_kwargs(args, command))
    elif command in XLORA_SUBCOMMANDS:
        kwargs.update(_xlora_kwargs(args, command))
    elif command == "speculative":
        kwargs.update(model=args.model_id, gguf_file=args.quantized_filename, draft_model=args.draft_model_id,
                      draft_gguf_file=args.draft_quantized_filename, draft_isq=args.draft_isq,
                      speculative_gamma=args.gamma)
    elif command is not None:
        raise NotSupportedError(f"the {command} subcommand does not select a model to serve")

    optional = {
        "max_num_batched_tokens": args.max_num_batched_tokens or args.prompt_chunksize,
        "pa_blk_size": args.pa_blk_size,
        # mistral.rs sizes the KV cache for --max-seq-len when no --pa-* size is given.
        "pa_ctxt_len": args.pa_ctxt_len or getattr(args, "max_seq_len", None),
        "pa_gpu_mem": args.pa_gpu_mem,
        "pa_gpu_mem_usage": args.pa_gpu_mem_usage,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    return kwargs


def configure_logging(level: int) -> None:
    # No force=True: a handler someone installed first (pytest's, an embedding app's) stays.
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    if level > logging.DEBUG:  # JAX's start-up chatter (e.g. "no TPU found") is debug material here
        logging.getLogger("jax").setLevel(max(level, logging.WARNING))


def apply_environment(args: argparse.Namespace) -> None:
    """Settings that act through the environment, applied before JAX / the Hub client start."""
    cache_path = getattr(args, "hf_cache_path", None)
    if cache_path:
        os.environ["HF_HUB_CACHE"] = os.path.abspath(os.path.expanduser(cache_path))
    if getattr(args, "cpu", False):
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
    join_cluster(args)


def join_cluster(args: argparse.Namespace) -> None:
    """With --coordinator-address / --num-processes / --process-id (or their JAX_* variables), join
    the multi-host run (jax.distributed) before anything touches a device. Only the HTTP server
    runs across processes: process 0 serves, the others follow its steps."""
    from .parallel.distributed import DistributedSettings, initialize

    settings = DistributedSettings.from_flags(getattr(args, "coordinator_address", None),
                                              getattr(args, "num_processes", None), getattr(args, "process_id", None),
                                              getattr(args, "distributed_timeout", None))
    if settings is None:
        return
    if getattr(args, "interactive_mode", False) or getattr(args, "tool", None):
        raise NotSupportedError("several processes (--coordinator-address/--num-processes) serve HTTP only: "
                                "drop -i, or run the TUI and benchmarks against process 0's server")
    initialize(settings)
