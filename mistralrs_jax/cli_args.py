"""The argument parsers of mistral.rs's command lines, shared by every entry point.

`mistralrs-server` / `mistralrs-jax` (mistralrs_jax.cli), `mistralrs` (mistralrs_jax.cli.verbs)
and the TUI (tui.cli) build their parsers from here, and turn the parsed arguments into
`LLM(...)` keyword arguments with mistralrs_jax.cli_kwargs. Kept light to import: `--help`
must not import JAX.

Global flags come before the model subcommand, as in mistral.rs. The flags that belong to
the model (--isq, --dtype, --cpu-weights, --token-source, ...) are also accepted after it.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from .config import DEFAULT_MAX_SEQS, DEFAULT_SPECULATIVE_GAMMA  # the one default each (config imports no JAX)
from .errors import InvalidRequestError
from .loading.hub import parse_token_source

DEFAULT_PORT = 1234
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFIX_CACHE_N = 16
DTYPES = ("auto", "bf16", "f16", "f32")

# Subcommands that select a model this engine can load.
MODEL_SUBCOMMANDS = ("plain", "gguf", "ggml", "run", "vision-plain", "lora", "lora-gguf", "lora-ggml", "speculative")
XLORA_SUBCOMMANDS = ("x-lora", "x-lora-gguf", "x-lora-ggml")
XLORA_MODEL_HELP = ("the X-LoRA model: a Hub repo id or local directory with its config, classifier and adapters, "
                    "or the path of its config JSON")
XLORA_ORDER_HELP = "mistral.rs ordering file (adapter order, projection indices); optional when the config lists adapters"
XLORA_NON_GRANULAR_HELP = "fix each sequence's X-LoRA scalings from this position on (those of position N-1)"
SUBCOMMAND_ALIASES = {"x-lora": ["x-lora-plain"], "diffusion": ["diffusion-plain"]}

LORA_HELP = "PEFT LoRA adapters merged into a safetensors model at load"
LORA_GGUF_HELP = "PEFT LoRA adapters merged into a GGUF (lora-gguf) or legacy GGML (lora-ggml) model at load"
LORA_ADAPTERS_HELP = ("LoRA adapter: a PEFT directory or Hub repo id (owner/name[/folder]), or several "
                      "comma-separated; with -o, the directory or repo holding the adapters the ordering file names")
LORA_ORDER_HELP = ("mistral.rs ordering JSON file: its \"order\" names the adapters (sub-folders of -a) to merge; "
                   "an entry may be {\"name\": ..., \"weight\": ...}")
ISQ_HELP = ("in-situ quantization to apply at load: an ISQ type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K..Q8K, "
            "HQQ4, HQQ8) or a bit count (2, 3, 4, 5, 6, 8: Q2K, Q3K, Q4K, Q5K, Q6K, Q8_0, as mistral.rs maps them)")

# mistral.rs's per-architecture subcommands from before `plain -a` (its model_selected.rs of
# April 2024), with their default models. Each is `base` with the architecture fixed; a
# default may be overridden with the usual flag. The GGUF ones keep the file defaults but not
# the -t tokenizer repo: the tokenizer is rebuilt from the GGUF (the old repos are gated).
_MISTRAL_GGUF = {"quantized_model_id": "TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
                 "quantized_filename": "mistral-7b-instruct-v0.1.Q4_K_M.gguf"}
_ZEPHYR_GGUF = {"quantized_model_id": "TheBloke/zephyr-7B-beta-GGUF", "quantized_filename": "zephyr-7b-beta.Q8_0.gguf"}
_LLAMA_GGUF = {"quantized_model_id": "TheBloke/Llama-2-13B-chat-GGUF",
               "quantized_filename": "llama-2-13b-chat.Q4_K_M.gguf"}
_LLAMA_GGML = {"quantized_model_id": "TheBloke/Llama-2-13B-chat-GGML",
               "quantized_filename": "llama-2-13b-chat.ggmlv3.q4_K_M.bin"}
_MIXTRAL_GGUF = {"quantized_model_id": "TheBloke/Mixtral-8x7B-v0.1-GGUF",
                 "quantized_filename": "mixtral-8x7b-v0.1.Q4_K_M.gguf"}
LEGACY_SUBCOMMANDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (base subcommand, architecture, defaults)
    "mistral": ("plain", "mistral", {"model_id": "mistralai/Mistral-7B-Instruct-v0.1"}),
    "gemma": ("plain", "gemma", {"model_id": "google/gemma-7b-it"}),
    "llama": ("plain", "llama", {"model_id": "meta-llama/Llama-2-13b-chat-hf"}),
    "mixtral": ("plain", "mixtral", {"model_id": "mistralai/Mixtral-8x7B-Instruct-v0.1"}),
    "phi2": ("plain", "phi2", {"model_id": "microsoft/phi-2"}),
    # Added to mistral.rs after the per-architecture subcommands: no default model, -m needed.
    "phi3": ("plain", "phi3", {}),
    "qwen2": ("plain", "qwen2", {}),
    "gemma2": ("plain", "gemma2", {}),
    "starcoder2": ("plain", "starcoder2", {}),
    "mistral-gguf": ("gguf", "mistral", _MISTRAL_GGUF),
    "llama-gguf": ("gguf", "llama", _LLAMA_GGUF),
    "mixtral-gguf": ("gguf", "mixtral", _MIXTRAL_GGUF),
    "phi2-gguf": ("gguf", "phi2", {"quantized_model_id": "TheBloke/phi-2-GGUF", "quantized_filename": "phi-2.Q4_K_M.gguf"}),
    "llama-ggml": ("ggml", "llama", _LLAMA_GGML),
    "x-lora-mistral": ("x-lora", "mistral", {"xlora_model_id": "lamm-mit/x-lora"}),
    "x-lora-gemma": ("x-lora", "gemma", {"xlora_model_id": "lamm-mit/x-lora-gemma-7b"}),
    "x-lora-llama": ("x-lora", "llama", {}),
    "x-lora-mixtral": ("x-lora", "mixtral", {}),
    "x-lora-phi2": ("x-lora", "phi2", {}),
    "x-lora-mistral-gguf": ("x-lora-gguf", "mistral", {**_ZEPHYR_GGUF, "xlora_model_id": "lamm-mit/x-lora"}),
    "x-lora-llama-gguf": ("x-lora-gguf", "llama", _LLAMA_GGUF),
    "x-lora-mixtral-gguf": ("x-lora-gguf", "mixtral", _MIXTRAL_GGUF),
    "x-lora-llama-ggml": ("x-lora-ggml", "llama", _LLAMA_GGML),
    "lora-mistral": ("lora", "mistral", {"adapters_model_id": "lamm-mit/x-lora"}),
    "lora-mixtral": ("lora", "mixtral", {}),
    "lora-llama": ("lora", "llama", {}),
    "lora-mistral-gguf": ("lora-gguf", "mistral", {**_ZEPHYR_GGUF, "adapters_model_id": "lamm-mit/x-lora"}),
    "lora-llama-gguf": ("lora-gguf", "llama", _LLAMA_GGUF),
    "lora-mixtral-gguf": ("lora-gguf", "mixtral", _MIXTRAL_GGUF),
    "lora-llama-ggml": ("lora-ggml", "llama", _LLAMA_GGML),
}
# Other spellings people use for them (the format first).
LEGACY_ALIASES = {"mistral-gguf": ["gguf-mistral"], "llama-gguf": ["gguf-llama"], "mixtral-gguf": ["gguf-mixtral"],
                  "phi2-gguf": ["gguf-phi2"], "llama-ggml": ["ggml-llama"]}


# --------------------------------------------------------------------------- value types


def token_source(value: str) -> str:
    try:
        parse_token_source(value)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


# --------------------------------------------------------------------------- global flags


def _non_negative(cast: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        number = cast(value)
        if not number >= 0:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be {what} >= 0, got {value}")
        return number

    return parse


non_negative_int = _non_negative(int, "an integer")
non_negative_float = _non_negative(float, "a number of seconds")


def add_global_flags(parser: argparse.ArgumentParser, verbs: bool = False) -> None:
    """The flags of mistralrs-server that come before the model subcommand.

    verbs=True: the `mistralrs serve/run` flavour, where -t, -i and -l mean other things
    (tokenizer, one-shot input; --log is a flag of `mistralrs` itself)."""
    serve = parser.add_argument_group("serving")
    serve.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                       help=f"HTTP port to serve on (default {DEFAULT_PORT})")
    serve.add_argument("--host", "--serve-ip", dest="host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}, loopback only, for safety; mistral.rs "
                            "binds 0.0.0.0: pass --host 0.0.0.0 to listen on every interface)")
    serve.add_argument("--api-key", default=os.environ.get("MISTRALRS_API_KEY"),
                       help="require this bearer token on HTTP requests (default: $MISTRALRS_API_KEY, or none)")
    if not verbs:
        serve.add_argument("-i", "--interactive-mode", action="store_true",
                           help="chat in the terminal instead of serving HTTP")
        add_log_flag(serve)
    serve.add_argument("--request-logging-file", metavar="FILE",
                       help="append every request and response to FILE (JSON lines)")
    serve.add_argument(*(("--truncate-sequence",) if verbs else ("-t", "--truncate-sequence")), action="store_true",
                       help="cut prompts longer than the context instead of rejecting them")
    if not verbs:
        serve.add_argument("-s", "--seed", type=int, help="default sampling seed, for reproducible output")
    serve.add_argument("--allowed-local-media-path", metavar="DIR",
                       help="let chat requests name image files (paths, file:// URLs) under DIR (as vLLM's flag); "
                            "by default the server reads no local file a client names")
    serve.add_argument("--max-waiting", type=non_negative_int, metavar="N",
                       help="generation requests queued beyond --max-seqs; one more is answered 503 with "
                            "Retry-After (default 256)")
    serve.add_argument("--shutdown-timeout", type=non_negative_float, metavar="S",
                       help="on SIGTERM/SIGINT, seconds the requests in flight get to finish before they are "
                            "aborted (default 30)")
    serve.add_argument("--stream-write-timeout", type=non_negative_float, metavar="S",
                       help="abort a streamed response whose client takes no data for S seconds (default 30; "
                            "0 waits forever)")
    serve.add_argument("--max-body-bytes", type=positive_int, metavar="N",
                       help="largest request body accepted, in bytes; larger is a 413 (default 16 MiB)")
    add_model_owned_flags(parser, top=True)

    sched = parser.add_argument_group("scheduling and KV cache")
    sched.add_argument("--max-seqs", type=positive_int, default=DEFAULT_MAX_SEQS,
                       help=f"most sequences running at once (default {DEFAULT_MAX_SEQS})")
    sched.add_argument("-tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=positive_int, default=1,
                       metavar="N", help="split the model over N devices (tensor parallelism; default 1)")
    sched.add_argument("--max-num-batched-tokens", type=positive_int,
                       help="token budget of one engine step (prefill chunk + decodes) (mistralrs-jax)")
    sched.add_argument("--prompt-batchsize", "--prompt-chunksize", dest="prompt_chunksize", type=positive_int,
                       help="prefill chunk size; sets --max-num-batched-tokens when that is not given")
    sched.add_argument("--prefix-cache-n", type=int, default=DEFAULT_PREFIX_CACHE_N,
                       help=f"prefix caches to keep (default {DEFAULT_PREFIX_CACHE_N}; 0 disables)")
    paged = sched.add_mutually_exclusive_group()
    paged.add_argument("--no-paged-attn", action="store_true", help="disable PagedAttention")
    if verbs:  # today's mistral.rs: --paged-attn auto|on|off
        paged.add_argument("--paged-attn", choices=("auto", "on", "off"), default="auto",
                           help="PagedAttention: auto and on use it, off disables it (default auto)")
    else:
        paged.add_argument("--paged-attn", action="store_true",
                           help="enable PagedAttention (accepted for compatibility: it is on by default)")
    sched.add_argument("--pa-gpu-mem", "--pa-memory-mb", dest="pa_gpu_mem", type=positive_int, metavar="MB",
                       help="KV cache size in MB")
    sched.add_argument("--pa-gpu-mem-usage", "--pa-memory-fraction", dest="pa_gpu_mem_usage", type=fraction,
                       metavar="FRACTION", help="fraction of device memory to use, KV cache included (0-1]")
    sched.add_argument("--pa-ctxt-len", "--pa-context-len", dest="pa_ctxt_len", type=positive_int, metavar="TOKENS",
                       help="tokens the KV cache holds in total (wins over --pa-gpu-mem*)")
    sched.add_argument("--pa-blk-size", "--pa-block-size", dest="pa_blk_size", type=positive_int, metavar="TOKENS",
                       help="tokens per KV cache block")
    sched.add_argument("--pa-cache-type", choices=("auto", "f8e4m3"), default="auto",
                       help="KV cache dtype (only auto is supported)")
    lora = parser.add_argument_group("per-request LoRA (mistralrs-jax)")
    lora.add_argument("--lora-mode", choices=("merged", "dynamic"), default="merged",
                      help="merged: -a adapters are merged into the weights at load (default); dynamic: they are held "
                           "unmerged and each request picks one (model \"base:adapter\" or the \"lora\" field), and "
                           "POST/DELETE /v1/loras change them while serving")
    lora.add_argument("--max-loras", type=positive_int, default=4,
                      help="adapter slots with --lora-mode dynamic (default 4)")
    lora.add_argument("--max-lora-rank", type=positive_int, default=16,
                      help="largest adapter rank a slot holds with --lora-mode dynamic (default 16, as vLLM; each "
                           "step computes every slot at this rank)")

    hosts = parser.add_argument_group("multi-host (jax.distributed): one command per host, process 0 serves HTTP")
    hosts.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address and a free port every process reaches "
                            "(default: $JAX_COORDINATOR_ADDRESS; unset: a single process)")
    hosts.add_argument("--num-processes", type=positive_int, metavar="P",
                       help="processes in the run, one per host (default: $JAX_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=non_negative_int, metavar="I",
                       help="this process's id in [0, P); 0 serves HTTP (default: $JAX_PROCESS_ID)")
    hosts.add_argument("--distributed-timeout", type=positive_int, metavar="S",
                       help="seconds to wait for every process to join, and for a silent peer before it counts "
                            "as dead (default 60)")
    sched.add_argument("-dp", "--data-parallel-size", dest="data_parallel_size", type=positive_int, default=1,
                       metavar="D", help="serve D replicas of the model, each on its own -tp devices, behind one "
                                         "server; requests go to the least-loaded one (default 1)")

    compat = parser.add_argument_group("mistral.rs flags for features mistralrs-jax lacks (they stop with an error)")
    compat.add_argument("--no-kv-cache", action="store_true", help=argparse.SUPPRESS)
    compat.add_argument("-n", "--num-device-layers", "--device-layers", dest="num_device_layers",
                        help=argparse.SUPPRESS)
    compat.add_argument("--enable-search", action="store_true", help=argparse.SUPPRESS)
    compat.add_argument("--search-bert-model", help=argparse.SUPPRESS)
    compat.add_argument("--search-embedding-model", help=argparse.SUPPRESS)
    compat.add_argument("--thinking", "--enable-thinking", dest="thinking", nargs="?", const="true",
                        help=argparse.SUPPRESS)
    compat.add_argument("--mcp-port", type=int, help=argparse.SUPPRESS)
    compat.add_argument("--mcp-config", help=argparse.SUPPRESS)


def add_log_flag(parser: Any, default: Any = None) -> None:
    parser.add_argument("-l", "--log", metavar="LEVEL|FILE", default=default,
                        help="a level (trace, debug, info, warning, error) sets the log level; anything else is a "
                             "file that every request and response is appended to, as in mistral.rs")


def add_model_owned_flags(parser: argparse.ArgumentParser, top: bool, draft: bool = True,
                          dtype_flags: tuple[str, ...] = ("--dtype",)) -> None:
    """The flags that belong to the model: before the subcommand (top=True, with their
    defaults) and after it (top=False: unset ones leave the value given before alone)."""

    def default(value: Any) -> dict[str, Any]:
        return {"default": value if top else argparse.SUPPRESS}

    model = parser.add_argument_group("model" if top else "model (also accepted before the subcommand)")
    model.add_argument("--token-source", type=token_source, **default("cache"),
                       help="Hugging Face token: cache (huggingface_hub's login / $HF_TOKEN), none, env:VAR, "
                            "literal:TOKEN or path:FILE (default cache)")
    model.add_argument("--revision", **default(None), help="Hub revision (branch, tag or commit) to download")
    model.add_argument("--hf-cache-path", "--hf-cache", dest="hf_cache_path", **default(None),
                       help="Hugging Face cache directory for downloads")
    model.add_argument("--isq", **default(None), help=ISQ_HELP)
    if draft:
        model.add_argument("--draft-isq", **default(None),
                           help="in-situ quantization of the speculative draft model (as --isq for the target)")
    model.add_argument("--isq-cache", metavar="DIR", **default(None),
                       help="keep ISQ'd weights under DIR so the next start with the same model and --isq "
                            "skips quantizing (mistralrs-jax)")
    model.add_argument(*dtype_flags, dest="dtype", type=str.lower, choices=DTYPES, **default("auto"), help="model dtype (default auto)")
    model.add_argument("--cpu", action="store_true", **default(False),
                       help="run on the CPU even when an accelerator is present")
    model.add_argument("--cpu-weights", choices=("f32", "quantized"), **default("quantized"),
                       help="quantized keeps GGUF weights packed at the file's bits per weight (less memory, "
                            "fast kernels); f32 dequantizes them once at load (mistralrs-jax; default quantized)")
    # After a subcommand, -c is mistral.rs's --calibration-file: long forms only there.
    chat_template = ("-c", "--chat-template") if top else ("--chat-template",)
    jinja = ("-j", "--jinja-explicit") if top else ("--jinja-explicit",)
    model.add_argument(*chat_template, metavar="FILE", **default(None),
                       help="chat template: a .json file with a `chat_template` field, or a .jinja file")
    model.add_argument(*jinja, metavar="FILE", **default(None),
                       help="a .jinja chat template that overrides every other template")


# --------------------------------------------------------------------------- model subcommands


def _add_device_map_hints(parser: argparse.ArgumentParser, vision: bool = False) -> None:
    # mistral.rs sizes its device map with these; here --max-seq-len sizes the KV cache
    # when --pa-ctxt-len is not given (mistral.rs does the same), the others are hints.
    parser.add_argument("--max-seq-len", type=positive_int, help="longest sequence to plan the KV cache for")
    parser.add_argument("--max-batch-size", type=positive_int, help="(device-mapping hint; accepted)")
    if vision:
        parser.add_argument("--max-num-images", type=positive_int, help="(device-mapping hint; accepted)")
        parser.add_argument("--max-image-length", type=positive_int, help="(device-mapping hint; accepted)")


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
    _add_device_map_hints(parser, vision)


def _plain(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-m", "--model-id", required=True, help="Hub repo id or local directory")
    parser.add_argument("-t", "--tokenizer-json", help="a local tokenizer.json to use instead of the model's")
    if name != "run":
        parser.add_argument("-a", "--arch", help="architecture (read from config.json; the flag is checked against it)")
    add_model_owned_flags(parser, top=False, draft=False, dtype_flags=("-d", "--dtype"))
    _add_safetensors_options(parser, vision=name == "vision-plain")


def _gguf(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-m", "--quantized-model-id", required=True, help="Hub repo id or local directory")
    parser.add_argument("-f", "--quantized-filename", required=True, help="the .gguf file in it")
    parser.add_argument("-t", "--tok-model-id", help="repo id or path to take the tokenizer (and template) from")
    add_model_owned_flags(parser, top=False, draft=False, dtype_flags=("-d", "--dtype"))
    parser.add_argument("--topology", help=argparse.SUPPRESS)
    _add_device_map_hints(parser)


def _adapter(parser: argparse.ArgumentParser, name: str) -> None:
    """`x-lora` and `lora` on a safetensors model."""
    parser.add_argument("-m", "--model-id", help="base model (default: the ordering file's base_model_id)")
    parser.add_argument("-t", "--tokenizer-json")
    if name == "x-lora":
        parser.add_argument("-x", "--xlora-model-id", required=True, help=XLORA_MODEL_HELP)
        parser.add_argument("-o", "--order", help=XLORA_ORDER_HELP)
        parser.add_argument("--tgt-non-granular-index", type=int, help=XLORA_NON_GRANULAR_HELP)
        parser.add_argument("-a", "--arch")
    else:
        parser.add_argument("-a", "--adapter-model-id", "--adapters-model-id", dest="adapters_model_id",
                            required=True, help=LORA_ADAPTERS_HELP)
        parser.add_argument("-o", "--order", help=LORA_ORDER_HELP)
        parser.add_argument("--arch")
    add_model_owned_flags(parser, top=False, draft=False, dtype_flags=("-d", "--dtype"))
    parser.add_argument("--topology")
    parser.add_argument("-w", "--write-uqff")
    parser.add_argument("-f", "--from-uqff")
    _add_device_map_hints(parser)


def _quantized_adapter(parser: argparse.ArgumentParser, name: str) -> None:
    """`ggml` and the (x-)lora-gguf / (x-)lora-ggml subcommands."""
    # mistral.rs requires -t for ggml; here the file's own vocabulary serves without it.
    parser.add_argument("-t", "--tok-model-id")
    if "ggml" in name:
        parser.add_argument("--tokenizer-json")
    parser.add_argument("-m", "--quantized-model-id", required=True)
    parser.add_argument("-f", "--quantized-filename", required=True)
    if name.startswith("x-lora"):
        parser.add_argument("-x", "--xlora-model-id", required=True, help=XLORA_MODEL_HELP)
        parser.add_argument("--tgt-non-granular-index", type=int, help=XLORA_NON_GRANULAR_HELP)
    elif name.startswith("lora"):
        parser.add_argument("-a", "--adapters-model-id", "--adapter-model-id", dest="adapters_model_id",
                            required=True, help=LORA_ADAPTERS_HELP)
    if "lora" in name:
        parser.add_argument("-o", "--order", help=LORA_ORDER_HELP)
    if "ggml" in name:
        parser.add_argument("-g", "--gqa", type=int, default=None,
                            help="query heads per KV head (default: read from the K projection's shape)")
    add_model_owned_flags(parser, top=False, draft=False, dtype_flags=("-d", "--dtype"))
    parser.add_argument("--topology")
    _add_device_map_hints(parser)


def _speculative(parser: argparse.ArgumentParser, name: str) -> None:
    # mistral.rs selects speculative decoding through a TOML file; this mirrors that section,
    # with the short flags of its docs' command lines: -d is the draft, -n gamma.
    parser.add_argument("-m", "--model-id", required=True, help="target model: repo id or path")
    parser.add_argument("-f", "--quantized-filename", help="target .gguf file in it")
    parser.add_argument("-d", "--draft-model-id", "--draft-model", dest="draft_model_id", required=True,
                        help="draft model: repo id or path")
    parser.add_argument("--draft-quantized-filename", help="draft .gguf file in it")
    parser.add_argument("-n", "-g", "--gamma", type=positive_int, default=DEFAULT_SPECULATIVE_GAMMA,
                        help=f"draft tokens per step (default {DEFAULT_SPECULATIVE_GAMMA}; mistral.rs' TOML "
                             "default is 32, which costs 32 draft passes a step)")
    add_model_owned_flags(parser, top=False)


def _toml(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-f", "--file", required=True)


def _diffusion(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-m", "--model-id", required=True)
    parser.add_argument("-a", "--arch", required=True)
    add_model_owned_flags(parser, top=False, draft=False, dtype_flags=("-d", "--dtype"))


def _speech(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-m", "--model-id", required=True)
    parser.add_argument("-d", "--dac-model-id")
    parser.add_argument("-a", "--arch", required=True)
    add_model_owned_flags(parser, top=False, draft=False)


# name -> (help, builder)
SUBCOMMANDS = {
    "plain": ("a Hugging Face safetensors model (repo id or local directory)", _plain),
    "run": ("any model, its kind detected (a .gguf file, or a safetensors repo/directory)", _plain),
    "gguf": ("a GGUF model file (from a Hub repo or a local directory)", _gguf),
    "vision-plain": ("a vision-language safetensors model", _plain),
    "toml": ("a model selected by a TOML file (not supported yet)", _toml),
    "x-lora": ("X-LoRA adapters on a safetensors model", _adapter),
    "lora": (LORA_HELP, _adapter),
    "x-lora-gguf": ("X-LoRA adapters on a GGUF model", _quantized_adapter),
    "lora-gguf": (LORA_GGUF_HELP, _quantized_adapter),
    "ggml": ("a legacy GGML (ggml/ggmf/ggjt v1-3) LLaMA file", _quantized_adapter),
    "x-lora-ggml": ("X-LoRA adapters on a GGML model", _quantized_adapter),
    "lora-ggml": (LORA_GGUF_HELP, _quantized_adapter),
    "diffusion": ("image generation models (not supported)", _diffusion),
    "speech": ("speech generation models (not supported)", _speech),
    "speculative": ("speculative decoding: a target model checks what a draft model with the same tokenizer "
                    "proposes (same output distribution, fewer target steps)", _speculative),
}


def add_model_subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Add mistral.rs's model subcommands (`plain`, `gguf`, ..., and the old `mistral`,
    `mistral-gguf`, `x-lora-mistral`, ...) to `parser`."""
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND",
                                       title="model (none: the default SmolLM2-135M-Instruct Q4_1 GGUF)")
    for name, (help_text, build) in SUBCOMMANDS.items():
        build(subparsers.add_parser(name, aliases=SUBCOMMAND_ALIASES.get(name, []), help=help_text,
                                    description=help_text), name)
    for name, (base, arch, defaults) in LEGACY_SUBCOMMANDS.items():
        _add_legacy_subcommand(subparsers, name, base, arch, defaults)
    return subparsers


def _add_legacy_subcommand(subparsers: argparse._SubParsersAction, name: str, base: str, arch: str,
                           defaults: dict[str, Any]) -> None:
    shown = ", ".join(f"{value}" for key, value in defaults.items() if key != "quantized_filename")
    help_text = f"(mistral.rs' old subcommand) `{base}` with the {arch} architecture" + (
        f"; default {shown}" if shown else "")
    sub = subparsers.add_parser(name, aliases=LEGACY_ALIASES.get(name, []), help=help_text, description=help_text)
    SUBCOMMANDS[base][1](sub, base)
    for action in sub._actions:  # a default stands in for a required value
        if action.dest in defaults:
            action.required = False
            action.help = f"{action.help or ''} (default {defaults[action.dest]})".strip()
        if action.dest == "arch":
            action.help = argparse.SUPPRESS  # fixed by the subcommand
    # `command` becomes the base subcommand (the sub-namespace is copied over the parent's).
    sub.set_defaults(**defaults, command=base, arch=arch, legacy_subcommand=name)
