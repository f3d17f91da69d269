"""The mistral.rs command lines of issue 14, mistral.rs's old per-architecture subcommands
and today's `mistralrs` verbs: each parses (no network) to the meaning mistral.rs gives it,
and, offline, a model line goes as far as it can and stops with the Hub error naming the repo.

The old subcommands' default models are those of mistral.rs's model_selected.rs of April 2024
(before `plain -a` replaced them)."""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mistralrs_jax import cli
from mistralrs_jax.cli import verbs
from mistralrs_jax.errors import InvalidRequestError
from mistralrs_jax.quant.isq import normalize_isq_type

REPO_ROOT = Path(__file__).resolve().parents[1]

# The command lines of the project's source documents, verbatim after `mistralrs-server`.
SEED_LINES = [
    "--port 8080 --log info gguf -m TheBloke/Llama-2-7B-Chat-GGUF -f llama-2-7b-chat.Q4_K_M.gguf",
    "--port 8080 plain -m mistralai/Mistral-7B-Instruct-v0.3 --isq Q4K",
    "--port 8080 vision-plain -m llava-hf/llava-1.5-7b-hf --isq Q4K",
    "--port 8080 speculative -m meta-llama/Meta-Llama-3-8B-Instruct --isq Q4K -d meta-llama/Meta-Llama-3-1B-Instruct "
    "--draft-isq Q4K -n 5",
    "--port 8080 x-lora-plain -m meta-llama/Meta-Llama-3-8B-Instruct --isq Q4K -x ./xlora-config.json",
    "--port 1234 x-lora-mistral -m HuggingFaceH4/zephyr-7b-beta -o ordering.json",
    "--port 1234 --log output.log mistral",
    "--port 1234 gguf-mistral",
    "--port 8080 --host 0.0.0.0 --log info --max-seqs 16 --token-source env:HF_TOKEN plain "
    "-m meta-llama/Meta-Llama-3-8B-Instruct --isq Q4K",
]


def parse(command_line: str):
    args = cli.build_parser().parse_args(shlex.split(command_line))
    args.command = cli.canonical_command(args.command)
    return args


def meaning(command_line: str) -> dict:
    """What a line asks for: the LLM(...) arguments that matter here, plus port, host and logs."""
    args = parse(command_line)
    kwargs = cli.build_llm_kwargs(args)
    keys = ("model", "gguf_file", "isq", "draft_model", "draft_isq", "speculative_gamma", "max_seqs", "token_source")
    level, request_log = cli.log_level_and_request_log(args)
    return {**{key: kwargs.get(key) for key in keys}, "command": args.command, "port": args.port,
            "host": args.host, "level": level, "request_log": request_log}


def test_seed_lines_parse_to_their_meaning():
    got = [meaning(line) for line in SEED_LINES if "x-lora" not in line]
    base = {"gguf_file": None, "isq": "Q4K", "draft_model": None, "draft_isq": None, "speculative_gamma": None,
            "max_seqs": cli.DEFAULT_MAX_SEQS, "token_source": "cache", "port": 8080, "host": "127.0.0.1",
            "level": logging.INFO, "request_log": None}
    expected = [
        {**base, "command": "gguf", "model": "TheBloke/Llama-2-7B-Chat-GGUF", "gguf_file": "llama-2-7b-chat.Q4_K_M.gguf",
         "isq": None},
        {**base, "command": "plain", "model": "mistralai/Mistral-7B-Instruct-v0.3"},
        {**base, "command": "vision-plain", "model": "llava-hf/llava-1.5-7b-hf"},
        {**base, "command": "speculative", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
         "draft_model": "meta-llama/Meta-Llama-3-1B-Instruct", "draft_isq": "Q4K", "speculative_gamma": 5},
        # --log output.log is not a level: as in mistral.rs, requests and responses go to that file.
        {**base, "command": "plain", "model": "mistralai/Mistral-7B-Instruct-v0.1", "isq": None, "port": 1234,
         "request_log": "output.log"},
        {**base, "command": "gguf", "model": "TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
         "gguf_file": "mistral-7b-instruct-v0.1.Q4_K_M.gguf", "isq": None, "port": 1234},
        {**base, "command": "plain", "model": "meta-llama/Meta-Llama-3-8B-Instruct", "host": "0.0.0.0",
         "max_seqs": 16, "token_source": "env:HF_TOKEN"},
    ]
    assert got == expected


@pytest.mark.parametrize("line", [line for line in SEED_LINES if "x-lora" in line])
def test_xlora_lines_select_the_xlora_model(line):
    """The seed's X-LoRA lines select the base model and the X-LoRA model (served: tests/test_xlora.py)."""
    args = parse(line)
    assert args.command == "x-lora" and args.port in (8080, 1234)
    kwargs = cli.build_llm_kwargs(args)
    base = "meta-llama/Meta-Llama-3-8B-Instruct" if "x-lora-plain" in line else "HuggingFaceH4/zephyr-7b-beta"
    assert (kwargs["model"], kwargs["xlora_model_id"], kwargs["xlora_order"]) in (
        (base, "./xlora-config.json", None), (base, "lamm-mit/x-lora", "ordering.json"))


def test_model_flags_go_before_or_after_the_subcommand():
    after = meaning("gguf -m r -f x.gguf --isq 4 --dtype bf16 --cpu-weights quantized --token-source none")
    before = meaning("--isq 4 --dtype bf16 --cpu-weights quantized --token-source none gguf -m r -f x.gguf")
    assert after == before and after["isq"] == "4" and normalize_isq_type(after["isq"]) == "Q4K"
    args = parse("--isq Q8_0 --dtype f16 plain -m x --isq-cache /tmp/c --cpu")
    assert (args.isq, args.dtype, args.isq_cache, args.cpu) == ("Q8_0", "f16", "/tmp/c", True)  # unset after: kept
    assert parse("plain -m x -d bf16").dtype == "bf16" and parse("--dtype f32").dtype == "f32"
    assert parse("plain -m x --hf-cache-path ./hf").hf_cache_path == "./hf"
    assert cli.build_llm_kwargs(parse("--chat-template t.jinja gguf -m r -f x.gguf"))["chat_template"] == "t.jinja"
    assert cli.build_llm_kwargs(parse("gguf -m r -f x.gguf --chat-template u.jinja"))["chat_template"] == "u.jinja"


def test_speculative_short_flags_and_long_forms():
    short = meaning("speculative -m T -d D -n 3 --draft-isq q4k")
    long = meaning("speculative -m T --draft-model-id D --gamma 3 --draft-isq q4k")
    assert short == long and (short["draft_model"], short["speculative_gamma"]) == ("D", 3)
    assert meaning("speculative -m T --draft-model-id D -g 2")["speculative_gamma"] == 2
    assert parse("speculative -m T -d D --dtype bf16").dtype == "bf16"


def test_draft_isq_without_a_draft_is_refused():
    with pytest.raises(InvalidRequestError, match="--draft-isq"):
        cli.build_llm_kwargs(parse("--draft-isq Q4K plain -m x"))


# The old per-architecture subcommands: line -> (command, model, gguf file, architecture).
LEGACY = {
    "mistral": ("plain", "mistralai/Mistral-7B-Instruct-v0.1", None, "mistral"),
    "gemma": ("plain", "google/gemma-7b-it", None, "gemma"),
    "llama": ("plain", "meta-llama/Llama-2-13b-chat-hf", None, "llama"),
    "mixtral": ("plain", "mistralai/Mixtral-8x7B-Instruct-v0.1", None, "mixtral"),
    "phi2": ("plain", "microsoft/phi-2", None, "phi2"),
    "phi3 -m microsoft/Phi-3-mini-4k-instruct": ("plain", "microsoft/Phi-3-mini-4k-instruct", None, "phi3"),
    "qwen2 -m Qwen/Qwen2-0.5B-Instruct": ("plain", "Qwen/Qwen2-0.5B-Instruct", None, "qwen2"),
    "starcoder2 -m bigcode/starcoder2-3b": ("plain", "bigcode/starcoder2-3b", None, "starcoder2"),
    "mistral -m ./my-mistral": ("plain", "./my-mistral", None, "mistral"),
    "mistral-gguf": ("gguf", "TheBloke/Mistral-7B-Instruct-v0.1-GGUF", "mistral-7b-instruct-v0.1.Q4_K_M.gguf",
                     "mistral"),
    "gguf-mistral -f other.gguf": ("gguf", "TheBloke/Mistral-7B-Instruct-v0.1-GGUF", "other.gguf", "mistral"),
    "llama-gguf": ("gguf", "TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q4_K_M.gguf", "llama"),
    "gguf-llama": ("gguf", "TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q4_K_M.gguf", "llama"),
    "mixtral-gguf": ("gguf", "TheBloke/Mixtral-8x7B-v0.1-GGUF", "mixtral-8x7b-v0.1.Q4_K_M.gguf", "mixtral"),
    "phi2-gguf": ("gguf", "TheBloke/phi-2-GGUF", "phi-2.Q4_K_M.gguf", "phi2"),
    "llama-ggml": ("ggml", "TheBloke/Llama-2-13B-chat-GGML", "llama-2-13b-chat.ggmlv3.q4_K_M.bin", "llama"),
}


@pytest.mark.parametrize("line", list(LEGACY))
def test_old_per_architecture_subcommands(line):
    command, model, gguf_file, arch = LEGACY[line]
    args = parse(f"--isq Q4K {line} --dtype bf16")
    kwargs = cli.build_llm_kwargs(args)
    assert (args.command, kwargs["model"], kwargs["gguf_file"], args.arch) == (command, model, gguf_file, arch)
    name = line.split()[0]
    assert (kwargs["isq"], kwargs["dtype"]) == ("Q4K", "bf16")
    assert args.legacy_subcommand == {"gguf-mistral": "mistral-gguf", "gguf-llama": "llama-gguf"}.get(name, name)


def test_old_xlora_and_lora_subcommands_keep_their_adapter_defaults():
    args = parse("x-lora-mistral -o ordering.json")
    assert (args.command, args.xlora_model_id, args.order, args.arch) == ("x-lora", "lamm-mit/x-lora", "ordering.json",
                                                                          "mistral")
    assert parse("x-lora-gemma -o o.json").xlora_model_id == "lamm-mit/x-lora-gemma-7b"
    args = parse("x-lora-mistral-gguf -o o.json")
    assert (args.command, args.quantized_model_id, args.quantized_filename) == (
        "x-lora-gguf", "TheBloke/zephyr-7B-beta-GGUF", "zephyr-7b-beta.Q8_0.gguf")
    args = parse("lora-mistral -o o.json")
    assert (args.command, args.adapters_model_id, args.arch) == ("lora", "lamm-mit/x-lora", "mistral")
    with pytest.raises(SystemExit):
        parse("x-lora-llama -o o.json")  # the old binary had no default X-LoRA model for llama either


def test_phi3_alias_needs_a_model(capsys):
    with pytest.raises(SystemExit) as info:
        parse("phi3")
    assert info.value.code == 2 and "-m/--model-id" in capsys.readouterr().err


# --------------------------------------------------------------------------- `mistralrs` verbs


def verb_args(command_line: str):
    args = verbs.build_parser().parse_args(shlex.split(command_line))
    return args, (verbs.server_args(args) if args.verb != "bench" else None)


def test_mistralrs_serve_run_and_bench_parse():
    args, server = verb_args("serve -m Qwen/Qwen2.5-0.5B-Instruct --isq 4 -p 8080")
    kwargs = cli.build_llm_kwargs(server)
    assert (server.command, kwargs["model"], server.port, server.interactive_mode) == (
        "run", "Qwen/Qwen2.5-0.5B-Instruct", 8080, False)
    assert normalize_isq_type(kwargs["isq"]) == "Q4K" and normalize_isq_type("8") == "Q8_0"  # as mistral.rs maps
    assert cli.build_llm_kwargs(verb_args("serve -m r --isq Q4K")[1])["isq"] == "Q4K"

    args, server = verb_args("--seed 7 --token-source env:T serve -m TheBloke/X-GGUF -f x.Q4_K_M.gguf --log info")
    kwargs = cli.build_llm_kwargs(server)
    assert (server.command, kwargs["model"], kwargs["gguf_file"], kwargs["token_source"], server.seed) == (
        "gguf", "TheBloke/X-GGUF", "x.Q4_K_M.gguf", "env:T", 7)
    assert cli.log_level_and_request_log(server) == (logging.INFO, None)

    args, server = verb_args("run -m ./qwen -v")
    assert (server.command, server.interactive_mode, server.model_id) == ("run", True, "./qwen")
    assert cli.log_level_and_request_log(server)[0] == logging.DEBUG
    assert verb_args("run -i 'Hello there'")[0].input == "Hello there"
    assert cli.build_llm_kwargs(verb_args("serve")[1])["model"] is None  # the default model
    assert cli.build_llm_kwargs(verb_args("serve --paged-attn off")[1])["no_paged_attn"] is True

    args, _ = verb_args("bench -m r -f x.gguf --prompt-len 64 --gen-len 16 --iterations 2")
    assert (args.model_id, args.quantized_file, args.prompt_len, args.gen_len, args.iterations) == (
        "r", "x.gguf", 64, 16, 2)
    defaults, _ = verb_args("bench")
    assert (defaults.prompt_len, defaults.gen_len, defaults.iterations) == (512, 128, 3)  # mistral.rs's


def test_mistralrs_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mistralrs"] == "mistralrs_jax.cli.verbs:main"
    assert scripts["mistralrs-server"] == scripts["mistralrs-jax"] == "mistralrs_jax.cli:main"


# --------------------------------------------------------------------------- imports and end to end


def test_tui_takes_its_flags_from_below_the_entry_point():
    code = ("import argparse, sys, tui.cli; tui.cli.add_arguments(argparse.ArgumentParser()); "
            "print('mistralrs_jax.cli' in sys.modules, 'jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"], result.stderr


def offline_env(tmp_path: Path) -> dict:
    # An empty Hugging Face home and HF_HUB_OFFLINE: the Hub is never contacted.
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), JAX_PLATFORMS="cpu")


@pytest.mark.parametrize("argv, repo", [
    (["mistralrs_jax.cli", *shlex.split(SEED_LINES[1])], "mistralai/Mistral-7B-Instruct-v0.3"),
    (["mistralrs_jax.cli", *shlex.split(SEED_LINES[7])], "TheBloke/Mistral-7B-Instruct-v0.1-GGUF"),
    (["mistralrs_jax.cli.verbs", "serve", "-m", "Qwen/Qwen2.5-0.5B-Instruct", "--isq", "4"],
     "Qwen/Qwen2.5-0.5B-Instruct"),
])
def test_offline_lines_stop_at_the_hub_naming_the_repo(argv, repo, tmp_path):
    result = subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr[-3000:]  # 2 would be a usage error
    last = result.stderr.strip().splitlines()[-1]
    assert ": error: cannot load" in last and repo in last and "HF_HUB_OFFLINE" in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr


def readme_command_lines() -> list[list[str]]:
    """The command lines of README's "Use" section, continuation lines joined, comments dropped."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## Use", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_every_readme_command_line_parses():
    lines = readme_command_lines()
    assert {argv[0] for argv in lines} == {"mistralrs-server", "mistralrs-jax", "mistralrs"}
    for argv in lines:
        parser = verbs.build_parser() if argv[0] == "mistralrs" else cli.build_parser()
        parser.parse_args(argv[1:])  # a usage error would exit 2 here


@pytest.mark.slow
def test_mistralrs_run_answers_one_prompt(smollm2_gguf_path, tmp_path):
    """`mistralrs run -i TEXT` end to end on the real default model: one answer, then exit 0,
    the exchange appended to the --log file."""
    log_file = tmp_path / "requests.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "mistralrs_jax.cli.verbs", "--seed", "0", "--log", str(log_file), "run",
         "--max-seqs", "1", "--max-num-batched-tokens", "64", "-i", "What is the capital of France? Answer in one word."],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout, result.stdout
    assert "What is the capital of France? Answer in one word." in log_file.read_text()


@pytest.mark.slow
def test_log_file_receives_the_served_requests(smollm2_gguf_path, tmp_path):
    """`mistralrs-server --port P --log FILE` (the seed's `--log output.log` line, on the default model):
    the server answers, and FILE receives the exchange as a JSON line; SIGTERM then exits 0."""
    import json
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_file = tmp_path / "output.log"
    server = subprocess.Popen([sys.executable, "-m", "mistralrs_jax.cli", "--port", str(port), "--log", str(log_file),
                               "--max-seqs", "2"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    question = "Say hello to the log."
    try:
        deadline, reply = time.monotonic() + 500, None
        while reply is None and time.monotonic() < deadline and server.poll() is None:
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
                    "model": "default", "messages": [{"role": "user", "content": question}], "max_tokens": 4})
            except httpx.TransportError:
                time.sleep(0.5)
        assert reply is not None and reply.status_code == 200, server.poll()
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=120)
    assert server.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(records) == 1 and records[0]["status"] == 200 and records[0]["route"] == "/v1/chat/completions"
    assert records[0]["params"]["messages"][0]["content"] == question
    assert records[0]["response"] == [reply.json()["choices"][0]["message"]["content"]]
