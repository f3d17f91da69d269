"""`mistralrs-server` / `mistralrs-jax`: the command line of mistral.rs, wired to this engine.

Global flags come before the model subcommand, as in mistral.rs:

    mistralrs-server --port 1234 --log info gguf -m REPO_OR_DIR -f FILE.gguf
    mistralrs-server -i plain -m ./my-model-dir
    mistralrs-server -i                      # the default model (SmolLM2-135M-Instruct Q4_1)

Every mistral.rs flag and subcommand parses. One this engine cannot honour yet stops
with a one-line error naming it; none is ignored silently.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Callable

from .errors import InvalidRequestError, MistralRsError, NotSupportedError
from .loading.hub import parse_token_source

log = logging.getLogger(__name__)

DEFAULT_PORT = 1234
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_SEQS = 16  # mistral.rs's default
DEFAULT_PREFIX_CACHE_N = 16
# engine/speculative.py's DEFAULT_GAMMA (not imported: --help must not import JAX).
DEFAULT_SPECULATIVE_GAMMA = 4
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
DTYPES = ("auto", "bf16", "f16", "f32")

# Subcommands that select a model this engine can load, and how their flags name it.
MODEL_SUBCOMMANDS = ("plain", "gguf", "ggml", "run", "vision-plain", "lora", "lora-gguf", "lora-ggml", "speculative")

# Subcommands mistral.rs has whose feature this engine lacks: name -> why / what to do instead.
UNSUPPORTED_SUBCOMMANDS = {
    "toml": "TOML model selectors are not supported yet in mistralrs-jax; use the `plain` or `gguf` subcommand",
    "x-lora": "X-LoRA adapters are not supported yet in mistralrs-jax; run the base model with `plain -m BASE`",
    "x-lora-gguf": "X-LoRA adapters are not supported yet in mistralrs-jax; run the base model with `gguf -m ... -f ...`",
    "x-lora-ggml": "X-LoRA adapters are not supported yet in mistralrs-jax; run the base model with `ggml -m ... -f ...`",
    "diffusion": "diffusion (image generation) models are not supported by mistralrs-jax",
    "speech": "speech generation models are not supported by mistralrs-jax",
}
SUBCOMMAND_ALIASES = {"x-lora": ["x-lora-plain"], "diffusion": ["diffusion-plain"]}

LORA_HELP = "PEFT LoRA adapters merged into a safetensors model at load"
LORA_GGUF_HELP = "PEFT LoRA adapters merged into a GGUF (lora-gguf) or legacy GGML (lora-ggml) model at load"
LORA_ADAPTERS_HELP = ("LoRA adapter: a PEFT directory or Hub repo id (owner/name[/folder]), or several "
                      "comma-separated; with -o, the directory or repo holding the adapters the ordering file names")
LORA_ORDER_HELP = ("mistral.rs ordering JSON file: its \"order\" names the adapters (sub-folders of -a) to merge; "
                   "an entry may be {\"name\": ..., \"weight\": ...}")

# Tool subcommands owned by other packages: name -> module. The module (kept light to
# import) provides `add_arguments(parser)` and `run(args) -> int`; it may call
# `add_model_subcommands(parser)` to take a model selection after its own flags.
TOOL_SUBCOMMANDS = {"tui": "tui.cli", "bench": "benchmarks.cli"}

# Flags mistral.rs has that select a feature this engine lacks: dest -> message.
# Only a flag the user actually set triggers its message.
UNSUPPORTED_FLAGS = {
    "no_kv_cache": "--no-kv-cache is not supported: mistralrs-jax always uses its (paged) KV cache",
    "num_device_layers": "-n/--num-device-layers is not supported: mistralrs-jax places the whole model on "
                         "its JAX device(s)",
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


# --------------------------------------------------------------------------- parser


def _token_source(value: str) -> str:
    try:
        parse_token_source(value)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _add_global_flags(parser: argparse.ArgumentParser) -> None:
    serve = parser.add_argument_group("serving")
    serve.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                       help=f"HTTP port to serve on (default {DEFAULT_PORT})")
    serve.add_argument("--host", "--serve-ip", dest="host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}, loopback only, for safety; mistral.rs "
                            "binds 0.0.0.0: pass --host 0.0.0.0 to listen on every interface)")
    serve.add_argument("--api-key", default=os.environ.get("MISTRALRS_API_KEY"),
                       help="require this bearer token on HTTP requests (default: $MISTRALRS_API_KEY, or none)")
    serve.add_argument("-i", "--interactive-mode", action="store_true",
                       help="chat in the terminal instead of serving HTTP")
    serve.add_argument("-l", "--log", metavar="LEVEL|FILE",
                       help="a level (trace, debug, info, warning, error) sets the log level; anything else is a "
                            "file that every request and response is appended to, as in mistral.rs")
    serve.add_argument("--request-logging-file", metavar="FILE",
                       help="append every request and response to FILE (JSON lines)")
    serve.add_argument("-t", "--truncate-sequence", action="store_true",
                       help="cut prompts longer than the context instead of rejecting them")
    serve.add_argument("-s", "--seed", type=int, help="default sampling seed, for reproducible output")
    serve.add_argument("--allowed-local-media-path", metavar="DIR",
                       help="let chat requests name image files (paths, file:// URLs) under DIR (as vLLM's flag); "
                            "by default the server reads no local file a client names")

    model = parser.add_argument_group("model")
    model.add_argument("--token-source", type=_token_source, default="cache",
                       help="Hugging Face token: cache (huggingface_hub's login / $HF_TOKEN), none, env:VAR, "
                            "literal:TOKEN or path:FILE (default cache)")
    model.add_argument("--revision", help="Hub revision (branch, tag or commit) to download (mistralrs-jax)")
    model.add_argument("-c", "--chat-template", metavar="FILE",
                       help="chat template: a .json file with a `chat_template` field, or a .jinja file")
    model.add_argument("-j", "--jinja-explicit", metavar="FILE",
                       help="a .jinja chat template that overrides every other template")
    model.add_argument("--isq", help="in-situ quantization to apply at load: an ISQ type (Q4_0, Q4_1, Q5_0, Q5_1, "
                                     "Q8_0, Q8_1, Q2K..Q8K, HQQ4, HQQ8) or a bit count (2, 3, 4, 5, 6, 8)")
    model.add_argument("--isq-cache", metavar="DIR",
                       help="keep ISQ'd weights under DIR so the next start with the same model and --isq "
                            "skips quantizing (mistralrs-jax)")
    model.add_argument("--cpu", action="store_true", help="run on the CPU even when an accelerator is present")
    model.add_argument("--cpu-weights", choices=("f32", "quantized"), default="f32",
                       help="on CPU: f32 dequantizes GGUF weights once at load (fast); quantized keeps "
                            "them in blocks (less memory) (mistralrs-jax; default f32)")

    sched = parser.add_argument_group("scheduling and KV cache")
    sched.add_argument("--max-seqs", type=_positive_int, default=DEFAULT_MAX_SEQS,
                       help=f"most sequences running at once (default {DEFAULT_MAX_SEQS})")
    sched.add_argument("--max-num-batched-tokens", type=_positive_int,
                       help="token budget of one engine step (prefill chunk + decodes) (mistralrs-jax)")
    sched.add_argument("--prompt-batchsize", "--prompt-chunksize", dest="prompt_chunksize", type=_positive_int,
                       help="prefill chunk size; sets --max-num-batched-tokens when that is not given")
    sched.add_argument("--prefix-cache-n", type=int, default=DEFAULT_PREFIX_CACHE_N,
                       help=f"prefix caches to keep (default {DEFAULT_PREFIX_CACHE_N}; 0 disables)")
    paged = sched.add_mutually_exclusive_group()
    paged.add_argument("--no-paged-attn", action="store_true", help="disable PagedAttention")
    paged.add_argument("--paged-attn", action="store_true",
                       help="enable PagedAttention (accepted for compatibility: it is on by default)")
    sched.add_argument("--pa-gpu-mem", type=_positive_int, metavar="MB", help="KV cache size in MB")
    sched.add_argument("--pa-gpu-mem-usage", type=_fraction, metavar="FRACTION",
                       help="fraction of device memory to use, KV cache included (0-1]")
    sched.add_argument("--pa-ctxt-len", type=_positive_int, metavar="TOKENS",
                       help="tokens the KV cache holds in total (wins over --pa-gpu-mem*)")
    sched.add_argument("--pa-blk-size", type=_positive_int, metavar="TOKENS", help="tokens per KV cache block")
    sched.add_argument("--pa-cache-type", choices=("auto", "f8e4m3"), default="auto",
                       help="KV cache dtype (only auto is supported)")

    compat = parser.add_argument_group("mistral.rs flags for features mistralrs-jax lacks (they stop with an error)")
    compat.add_argument("--no-kv-cache", action="store_true", help=argparse.SUPPRESS)
    compat.add_argument("-n", "--num-device-layers", help=argparse.SUPPRESS)
    compat.add_argument("--enable-search", action="store_true", help=argparse.SUPPRESS)
    compat.add_argument("--search-bert-model", help=argparse.SUPPRESS)
    compat.add_argument("--search-embedding-model", help=argparse.SUPPRESS)
    compat.add_argument("--thinking", "--enable-thinking", dest="thinking", nargs="?", const="true",
                        help=argparse.SUPPRESS)
    compat.add_argument("--mcp-port", type=int, help=argparse.SUPPRESS)
    compat.add_argument("--mcp-config", help=argparse.SUPPRESS)


def _add_dtype(parser: argparse.ArgumentParser, short: bool = True) -> None:
    flags = ("-d", "--dtype") if short else ("--dtype",)
    parser.add_argument(*flags, type=str.lower, choices=DTYPES, default="auto", help="model dtype (default auto)")


def _add_device_map_hints(parser: argparse.ArgumentParser, vision: bool = False) -> None:
    # mistral.rs sizes its device map with these; here --max-seq-len sizes the KV cache
    # when --pa-ctxt-len is not given (mistral.rs does the same), the others are hints.
    parser.add_argument("--max-seq-len", type=_positive_int, help="longest sequence to plan the KV cache for")
    parser.add_argument("--max-batch-size", type=_positive_int, help="(device-mapping hint; accepted)")
    if vision:
        parser.add_argument("--max-num-images", type=_positive_int, help="(device-mapping hint; accepted)")
        parser.add_argument("--max-image-length", type=_positive_int, help="(device-mapping hint; accepted)")


def _add_safetensors_options(parser: argparse.ArgumentParser, vision: bool = False) -> None:
    parser.add_argument("--topology", help=argparse.SUPPRESS)
    if not vision:
        parser.add_argument("-o", "--organization", help=argparse.SUPPRESS)
    parser.add_argument("-w", "--write-uqff", help=argparse.SUPPRESS)
    parser.add_argument("-f", "--from-uqff", help=argparse.SUPPRESS)
    parser.add_argument("-i", "--imatrix", help=argparse.SUPPRESS)
    parser.add_argument("-c", "--calibration-file", help=argparse.SUPPRESS)
    if vision:
        parser.add_argument("-e", "--max-edge", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hf-cache-path", help="Hugging Face cache directory for downloads")
    _add_device_map_hints(parser, vision)


def add_model_subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Add mistral.rs's model subcommands (`plain`, `gguf`, ...) to `parser`."""
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND",
                                       title="model (none: the default SmolLM2-135M-Instruct Q4_1 GGUF)")

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, aliases=SUBCOMMAND_ALIASES.get(name, []), help=help_text,
                                     description=help_text)

    plain = sub("plain", "a Hugging Face safetensors model (repo id or local directory)")
    plain.add_argument("-m", "--model-id", required=True, help="Hub repo id or local directory")
    plain.add_argument("-t", "--tokenizer-json", help="a local tokenizer.json to use instead of the model's")
    plain.add_argument("-a", "--arch", help="architecture (read from config.json; the flag is checked against it)")
    _add_dtype(plain)
    _add_safetensors_options(plain)

    run = sub("run", "any model, its kind detected (a .gguf file, or a safetensors repo/directory)")
    run.add_argument("-m", "--model-id", required=True, help="Hub repo id or local path")
    run.add_argument("-t", "--tokenizer-json", help="a local tokenizer.json to use instead of the model's")
    _add_dtype(run)
    _add_safetensors_options(run)

    gguf = sub("gguf", "a GGUF model file (from a Hub repo or a local directory)")
    gguf.add_argument("-m", "--quantized-model-id", required=True, help="Hub repo id or local directory")
    gguf.add_argument("-f", "--quantized-filename", required=True, help="the .gguf file in it")
    gguf.add_argument("-t", "--tok-model-id", help="repo id or path to take the tokenizer (and template) from")
    _add_dtype(gguf)
    gguf.add_argument("--topology", help=argparse.SUPPRESS)
    _add_device_map_hints(gguf)

    vision = sub("vision-plain", "a vision-language safetensors model")
    vision.add_argument("-m", "--model-id", required=True, help="Hub repo id or local directory")
    vision.add_argument("-t", "--tokenizer-json", help="a local tokenizer.json to use instead of the model's")
    vision.add_argument("-a", "--arch", help="architecture (read from config.json; the flag is checked against it)")
    _add_dtype(vision)
    _add_safetensors_options(vision, vision=True)

    # The rest parse as in mistral.rs, then stop with UNSUPPORTED_SUBCOMMANDS' message.
    toml = sub("toml", "a model selected by a TOML file (not supported yet)")
    toml.add_argument("-f", "--file", required=True)

    for name, label, arch_short in (("x-lora", "X-LoRA", True), ("lora", "LoRA", False)):
        adapter = sub(name, LORA_HELP if name == "lora"
                      else f"{label} adapters on a safetensors model (not supported yet)")
        adapter.add_argument("-m", "--model-id")
        adapter.add_argument("-t", "--tokenizer-json")
        if name == "x-lora":
            adapter.add_argument("-x", "--xlora-model-id", required=True)
            adapter.add_argument("-o", "--order", required=True)
            adapter.add_argument("--tgt-non-granular-index", type=int)
        else:
            adapter.add_argument("-a", "--adapter-model-id", "--adapters-model-id", dest="adapters_model_id",
                                 required=True, help=LORA_ADAPTERS_HELP)
            adapter.add_argument("-o", "--order", help=LORA_ORDER_HELP)
        adapter.add_argument(*(("-a", "--arch") if arch_short else ("--arch",)))
        _add_dtype(adapter)
        adapter.add_argument("--topology")
        adapter.add_argument("-w", "--write-uqff")
        adapter.add_argument("-f", "--from-uqff")
        adapter.add_argument("--hf-cache-path")
        _add_device_map_hints(adapter)

    for name in ("x-lora-gguf", "lora-gguf", "ggml", "x-lora-ggml", "lora-ggml"):
        quantized = sub(name, "a legacy GGML (ggml/ggmf/ggjt v1-3) LLaMA file" if name == "ggml"
                        else LORA_GGUF_HELP if name.startswith("lora") else f"{name} models (not supported)")
        # mistral.rs requires -t for ggml; here the file's own vocabulary serves without it.
        quantized.add_argument("-t", "--tok-model-id")
        if "ggml" in name:
            quantized.add_argument("--tokenizer-json")
        quantized.add_argument("-m", "--quantized-model-id", required=True)
        quantized.add_argument("-f", "--quantized-filename", required=True)
        if name.startswith("x-lora"):
            quantized.add_argument("-x", "--xlora-model-id", required=True)
            quantized.add_argument("--tgt-non-granular-index", type=int)
        elif name.startswith("lora"):
            quantized.add_argument("-a", "--adapters-model-id", "--adapter-model-id", dest="adapters_model_id",
                                   required=True, help=LORA_ADAPTERS_HELP)
        if "lora" in name:
            quantized.add_argument("-o", "--order", required=name.startswith("x-lora"), help=LORA_ORDER_HELP)
        if "ggml" in name:
            quantized.add_argument("-g", "--gqa", type=int, default=None,
                                   help="query heads per KV head (default: read from the K projection's shape)")
        _add_dtype(quantized)
        quantized.add_argument("--topology")
        _add_device_map_hints(quantized)

    diffusion = sub("diffusion", "image generation models (not supported)")
    diffusion.add_argument("-m", "--model-id", required=True)
    diffusion.add_argument("-a", "--arch", required=True)
    _add_dtype(diffusion)

    speech = sub("speech", "speech generation models (not supported)")
    speech.add_argument("-m", "--model-id", required=True)
    speech.add_argument("-d", "--dac-model-id")
    speech.add_argument("-a", "--arch", required=True)
    _add_dtype(speech, short=False)

    # mistral.rs selects speculative decoding through a TOML file; this mirrors that section.
    speculative = sub("speculative", "speculative decoding: a target model checks what a draft model with the same "
                                     "tokenizer proposes (same output distribution, fewer target steps)")
    speculative.add_argument("-m", "--model-id", required=True, help="target model: repo id or path")
    speculative.add_argument("-f", "--quantized-filename", help="target .gguf file in it")
    speculative.add_argument("--draft-model-id", required=True, help="draft model: repo id or path")
    speculative.add_argument("--draft-quantized-filename", help="draft .gguf file in it")
    speculative.add_argument("--draft-isq", help="in-situ quantization of the draft model (as --isq for the target)")
    speculative.add_argument("-g", "--gamma", type=_positive_int, default=DEFAULT_SPECULATIVE_GAMMA,
                             help=f"draft tokens per step (default {DEFAULT_SPECULATIVE_GAMMA}; mistral.rs' TOML "
                                  "default is 32, which costs 32 draft passes a step)")
    _add_dtype(speculative)
    return subparsers


def _add_tool_subcommands(subparsers: argparse._SubParsersAction) -> None:
    for name, module_name in TOOL_SUBCOMMANDS.items():
        module = _tool_module(module_name)
        if module is None:
            subparsers.add_parser(name, help=f"({name}: not available in this build)").set_defaults(tool=name)
            continue
        sub = subparsers.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        # `tool` survives a nested model subcommand overwriting `command` (see main()).
        sub.set_defaults(tool=name)
        module.add_arguments(sub)


def _tool_module(module_name: str) -> Any | None:
    package = module_name.partition(".")[0]
    if importlib.util.find_spec(package) is None or importlib.util.find_spec(module_name) is None:
        return None
    return importlib.import_module(module_name)


def build_parser() -> argparse.ArgumentParser:
    invoked_as = os.path.basename(sys.argv[0]) if sys.argv else ""
    parser = argparse.ArgumentParser(
        prog=invoked_as if invoked_as == "mistralrs-jax" else "mistralrs-server",
        description="mistralrs-jax: an OpenAI-compatible LLM server on JAX, with the command line of "
                    "mistral.rs. Global flags go before the model subcommand.",
        epilog="examples:\n"
               "  mistralrs-server -i\n"
               "  mistralrs-server --port 8080 --log info gguf -m ./models -f model.Q4_K_M.gguf\n"
               "  mistralrs-server --token-source env:HF_TOKEN plain -m HuggingFaceTB/SmolLM2-135M-Instruct",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_flags(parser)
    subparsers = add_model_subcommands(parser)
    _add_tool_subcommands(subparsers)
    return parser


# --------------------------------------------------------------------------- args -> LLM


def _canonical_command(command: str | None) -> str | None:
    for name, aliases in SUBCOMMAND_ALIASES.items():
        if command in aliases:
            return name
    return command


def log_level_and_request_log(args: argparse.Namespace) -> tuple[int, str | None]:
    """(logging level, request log file) from `--log` and `--request-logging-file`."""
    level, request_log = logging.INFO, args.request_logging_file
    if args.log is not None:
        if args.log.lower() in LOG_LEVELS:
            level = LOG_LEVELS[args.log.lower()]
        elif request_log is None:
            request_log = args.log
        else:
            raise InvalidRequestError(
                f"--log {args.log!r} is not a level ({', '.join(LOG_LEVELS)}) and --request-logging-file "
                "already names the request log", param="log")
    return level, request_log


def check_supported(args: argparse.Namespace) -> None:
    """Raise NotSupportedError for a subcommand or a set flag this engine cannot honour."""
    command = _canonical_command(args.command)
    if command in UNSUPPORTED_SUBCOMMANDS:
        raise NotSupportedError(UNSUPPORTED_SUBCOMMANDS[command])
    for dest, message in UNSUPPORTED_FLAGS.items():
        if getattr(args, dest, None) not in (None, False):
            raise NotSupportedError(message)
    if args.pa_cache_type != "auto":
        raise NotSupportedError(f"--pa-cache-type {args.pa_cache_type} is not supported yet; only auto")


def _lora_kwargs(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Model and adapters of `lora` / `lora-gguf` (adapters/sources.py reads the ordering file).

    `lora` without -m takes the base model from the ordering file's base_model_id, else from
    the first adapter's adapter_config.json, as mistral.rs does."""
    from .adapters.sources import adapters_from_cli, base_model_of

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
    command = _canonical_command(args.command)
    if command in TOOL_SUBCOMMANDS:  # a tool run without a nested model subcommand: the default model
        command = None
    kwargs: dict[str, Any] = {
        "model": None,
        "gguf_file": None,
        "tokenizer": None,
        "token_source": args.token_source,
        "revision": args.revision,
        "dtype": getattr(args, "dtype", "auto"),
        "max_seqs": args.max_seqs,
        "prefix_cache_n": args.prefix_cache_n,
        "no_paged_attn": args.no_paged_attn,
        "cpu_weights": args.cpu_weights,
        # mistral.rs: the explicit .jinja template overrides every other one.
        "chat_template": args.jinja_explicit or args.chat_template,
        "isq": args.isq,
        "isq_cache": getattr(args, "isq_cache", None),
    }
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


# --------------------------------------------------------------------------- running


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
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def _load_server() -> Callable[..., Any]:
    """`server.app.serve`, or a clear error when the HTTP server is not part of this build."""
    try:
        module = importlib.import_module("server.app")
    except ModuleNotFoundError as exc:
        if exc.name not in ("server", "server.app"):
            raise  # a dependency of the server is missing: show the real cause
        raise NotSupportedError("HTTP server not available yet in this build; use -i for a terminal chat") from None
    serve = getattr(module, "serve", None)
    if serve is None:
        raise NotSupportedError("HTTP server not available yet (server.app has no serve()); use -i for a terminal chat")
    return serve


def _check_arch(llm: Any, args: argparse.Namespace) -> None:
    wanted = getattr(args, "arch", None)
    found = getattr(getattr(llm, "model_config", None), "arch", None)
    if _canonical_command(getattr(args, "command", None)) == "vision-plain":
        vision = getattr(llm, "vision", None)
        if vision is None:
            from .models.vision import SUPPORTED_VISION_ARCHS

            raise NotSupportedError(f"vision-plain needs a vision model, but {llm.model_name} is a text model: serve "
                                    f"it with `plain` (vision architectures: {', '.join(SUPPORTED_VISION_ARCHS)})")
        found = vision.arch
    if wanted and found and wanted.replace("-", "").replace("_", "").lower() not in str(found).replace("_", "").lower():
        log.warning("--arch %s given, but the model's files say %s; using %s", wanted, found, found)


def run_model(args: argparse.Namespace) -> int:
    """Load the selected model, then chat in the terminal (-i) or serve HTTP."""
    kwargs = build_llm_kwargs(args)
    serve = None if args.interactive_mode else _load_server()  # fail before a long load
    apply_environment(args)
    from . import LLM

    llm = LLM(**kwargs)
    try:
        _check_arch(llm, args)
        if args.interactive_mode:
            from .interactive import InteractiveChat

            return InteractiveChat(llm, args).run(sys.stdin, sys.stdout)
        serve(llm, args)
        return 0
    finally:
        llm.shutdown()


def _run_tool(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        module = _tool_module(TOOL_SUBCOMMANDS[name])
        if module is None:
            raise NotSupportedError(f"the {name} subcommand is not available in this build")
        return int(module.run(args) or 0)

    return handler


# Subcommand name -> handler(args) -> exit code. None is "no subcommand": the default model.
SUBCOMMAND_HANDLERS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    None: run_model,
    **{name: run_model for name in MODEL_SUBCOMMANDS},
    **{name: run_model for name in UNSUPPORTED_SUBCOMMANDS},  # build_llm_kwargs stops them with their message
    **{name: _run_tool(name) for name in TOOL_SUBCOMMANDS},
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = _canonical_command(args.command)
    try:
        level, args.request_log_file = log_level_and_request_log(args)
        configure_logging(level)
        return SUBCOMMAND_HANDLERS[getattr(args, "tool", None) or args.command](args)
    except MistralRsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
