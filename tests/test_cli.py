"""The command line: mistral.rs's documented command lines parse and map onto LLM(...),
unsupported features stop with a clear error, and `-i` chats with the real default model.

The command lines below are copied from mistral.rs's README and docs (v0.6), so they are
the reference for "parses as mistral.rs does".
"""
from __future__ import annotations

import inspect
import io
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mistralrs_jax import SamplingParams, cli
from mistralrs_jax.interactive import InteractiveChat

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(command_line: str):
    return cli.build_parser().parse_args(shlex.split(command_line))


def kwargs_for(command_line: str) -> dict:
    return cli.build_llm_kwargs(parse(command_line))


# --------------------------------------------------------------------------- parsing and mapping


def test_defaults_follow_mistralrs():
    args = parse("")
    assert (args.port, args.host, args.max_seqs, args.prefix_cache_n, args.token_source) == (
        1234, "127.0.0.1", 16, 16, "cache")
    assert args.command is None and not args.interactive_mode
    kwargs = cli.build_llm_kwargs(args)
    assert kwargs["model"] is None and kwargs["gguf_file"] is None  # the default model
    assert kwargs["max_seqs"] == 16 and kwargs["no_paged_attn"] is False and kwargs["cpu_weights"] == "quantized"


def test_gguf_docs_command_line():
    args = parse("--port 1234 --log output.txt gguf -t HuggingFaceH4/zephyr-7b-beta "
                 "-m TheBloke/zephyr-7B-beta-GGUF -f zephyr-7b-beta.Q5_0.gguf")
    assert args.port == 1234 and args.command == "gguf"
    assert cli.log_level_and_request_log(args) == (logging.INFO, "output.txt")  # not a level: a request log
    kwargs = cli.build_llm_kwargs(args)
    assert (kwargs["model"], kwargs["gguf_file"], kwargs["tokenizer"]) == (
        "TheBloke/zephyr-7B-beta-GGUF", "zephyr-7b-beta.Q5_0.gguf", "HuggingFaceH4/zephyr-7b-beta")


def test_log_level_and_port():
    args = parse("--port 8080 --log info gguf -m ./models -f model.gguf")
    assert args.port == 8080 and cli.log_level_and_request_log(args) == (logging.INFO, None)
    assert cli.log_level_and_request_log(parse("--log DEBUG"))[0] == logging.DEBUG
    args = parse("--log warning --request-logging-file req.jsonl")
    assert cli.log_level_and_request_log(args) == (logging.WARNING, "req.jsonl")


def test_plain_docs_command_lines():
    kwargs = kwargs_for("--isq Q4K --port 1234 plain -m deepseek-ai/DeepSeek-V2-Lite")
    assert kwargs["model"] == "deepseek-ai/DeepSeek-V2-Lite" and kwargs["isq"] == "Q4K"
    args = parse("--port 1234 --log output.log --chat-template ./chat_templates/chatml.json "
                 "plain -m microsoft/Orca-2-13b --tokenizer-json tokenizer.json")
    kwargs = cli.build_llm_kwargs(args)
    assert (kwargs["model"], kwargs["tokenizer"], kwargs["chat_template"]) == (
        "microsoft/Orca-2-13b", "tokenizer.json", "./chat_templates/chatml.json")
    args = parse("-i --isq q4k plain -m meta-llama/Llama-3.3-70B-Instruct --max-seq-len 4096 --max-batch-size 2")
    assert args.interactive_mode
    assert cli.build_llm_kwargs(args)["pa_ctxt_len"] == 4096  # mistral.rs sizes the KV cache for it
    assert kwargs_for("plain -m x -a llama -d bf16")["dtype"] == "bf16"


def test_run_and_vision_plain_select_a_model():
    assert kwargs_for("--port 1234 run -m Qwen/Qwen3-4B")["model"] == "Qwen/Qwen3-4B"
    assert kwargs_for("-i vision-plain -m lamm-mit/Cephalo-Llama-3.2-11B-Vision-Instruct-128k")["model"] == (
        "lamm-mit/Cephalo-Llama-3.2-11B-Vision-Instruct-128k")


def test_scheduling_and_cache_flags_map():
    kwargs = kwargs_for("--max-seqs 16 --prefix-cache-n 16 --no-paged-attn --token-source env:HF_TOKEN "
                        "--pa-gpu-mem 4096 --pa-gpu-mem-usage 0.5 --pa-ctxt-len 2048 --pa-blk-size 32 "
                        "--max-num-batched-tokens 512 --cpu-weights quantized --revision v1 "
                        "gguf -m ./dir -f model.gguf")
    expected = {"max_seqs": 16, "prefix_cache_n": 16, "no_paged_attn": True, "token_source": "env:HF_TOKEN",
                "pa_gpu_mem": 4096, "pa_gpu_mem_usage": 0.5, "pa_ctxt_len": 2048, "pa_blk_size": 32,
                "max_num_batched_tokens": 512, "cpu_weights": "quantized", "revision": "v1"}
    assert {key: kwargs[key] for key in expected} == expected
    assert kwargs_for("--prompt-batchsize 128")["max_num_batched_tokens"] == 128
    assert "pa_blk_size" not in kwargs_for("")  # unset: LLM's own default applies


def test_jinja_explicit_overrides_chat_template():
    assert kwargs_for("--chat-template a.json --jinja-explicit b.jinja")["chat_template"] == "b.jinja"


def test_serve_ip_alias_and_short_flags():
    args = parse("--serve-ip 0.0.0.0 -p 9000 -s 7 -t -i")
    assert (args.host, args.port, args.seed, args.truncate_sequence, args.interactive_mode) == (
        "0.0.0.0", 9000, 7, True, True)


def test_kwargs_are_llm_parameters():
    from mistralrs_jax.llm import LLM

    accepted = set(inspect.signature(LLM.__init__).parameters)
    kwargs = kwargs_for("--max-num-batched-tokens 64 --pa-blk-size 16 --pa-ctxt-len 1024 --pa-gpu-mem 1 "
                        "--pa-gpu-mem-usage 0.5 gguf -m d -f f.gguf -t tok")
    assert set(kwargs) <= accepted, set(kwargs) - accepted


@pytest.mark.parametrize("command_line", [
    "--token-source bogus",
    "--token-source literal:",
    "--paged-attn --no-paged-attn",
    "--pa-gpu-mem-usage 1.5",
    "gguf -m repo",  # -f is required, as in mistral.rs
    "plain -m x --dtype f64",
    "--port 1234 plain -m x --port 8080",  # global flags go before the subcommand
])
def test_bad_command_lines_are_usage_errors(command_line, capsys):
    with pytest.raises(SystemExit) as info:
        parse(command_line)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- unsupported features


@pytest.mark.parametrize("command_line, message", [
    ("--port 1234 toml -f toml-selectors/gguf.toml", "TOML"),
    ("-i diffusion -m black-forest-labs/FLUX.1-schnell -a flux", "diffusion"),
    ("-i speech -m nari-labs/Dia-1.6B -a dia", "speech"),
    ("--no-kv-cache plain -m x", "--no-kv-cache"),
    ("--enable-search -i plain -m Qwen/Qwen3-4B", "--enable-search"),
    ("-n 0:16 plain -m x", "--num-device-layers"),
    ("--mcp-port 4321 plain -m Qwen/Qwen3-4B", "--mcp-port"),
    ("-i plain -m EricB/Phi-3.5-mini-instruct-UQFF --from-uqff phi3.5-mini-instruct-f8e4m3.uqff", "UQFF"),
    ("--pa-cache-type f8e4m3 plain -m x", "--pa-cache-type"),
])
def test_unsupported_features_stop_with_a_clear_error(command_line, message, capsys):
    started = time.monotonic()
    assert cli.main(shlex.split(command_line)) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("mistralrs-server: error:") and err.count("\n") == 1
    assert time.monotonic() - started < 2.0  # refused before any model is loaded


def test_missing_model_path_is_one_line_error():
    result = subprocess.run([sys.executable, "-m", "mistralrs_jax.cli", "-i", "gguf", "-m", "./no/such/dir",
                             "-f", "m.gguf"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr
    assert "model path not found: ./no/such/dir" in result.stderr and "Traceback" not in result.stderr


def test_help_does_not_import_jax():
    code = ("import sys, mistralrs_jax.cli as c, mistralrs_jax.cli.verbs as v; c.build_parser().format_help(); "
            "v.build_parser().format_help(); print('jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# --------------------------------------------------------------------------- interactive mode


def test_interactive_commands_and_history(llm):
    chat = InteractiveChat(llm, parse("-i --seed 3"))
    assert chat.params.seed == 3 and chat.params.temperature == pytest.approx(0.1)
    out = io.StringIO()
    script = "\\temperature 0\n\\topk 5\n\\system Answer in one short sentence.\nHi!\n\\bogus\n\\topp x\n"
    assert chat.run(io.StringIO(script), out) == 0  # piped input ends at EOF
    assert chat.params.temperature == 0 and chat.params.top_k == 5
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[0]["content"] == "Answer in one short sentence."
    assert chat.messages[2]["content"].strip(), "the model answered"
    text = out.getvalue()
    assert chat.messages[2]["content"] in text  # the reply was streamed to the terminal
    assert "unknown command \\bogus" in text and "\\topp needs a number" in text
    chat.run(io.StringIO("\\clear\n\\exit\nnot read\n"), out)
    assert chat.messages == []


def test_interactive_request_log(llm, tmp_path):
    log_file = tmp_path / "requests.jsonl"
    args = parse(f"-i --log {log_file}")
    args.request_log_file = cli.log_level_and_request_log(args)[1]
    chat = InteractiveChat(llm, args)
    chat.params = SamplingParams(temperature=0.0, max_tokens=8)
    chat.run(io.StringIO("Say hello.\n"), io.StringIO())

    record = json.loads(log_file.read_text().splitlines()[0])
    assert record["messages"] == [{"role": "user", "content": "Say hello."}]
    assert record["response"] == chat.messages[-1]["content"]


@pytest.mark.slow
def test_interactive_subprocess_ctrl_c_then_paris(smollm2_gguf_path, tmp_path):
    """`mistralrs-server -i` end to end on the real default model, input piped, greedy:
    Ctrl-C (SIGINT) stops a long reply without ending the session; the next question gets
    its answer and end of input exits cleanly."""
    script = tmp_path / "typed.txt"
    script.write_text("\\temperature 0\nWrite a very long story about a dragon.\nWhat is the capital of France? Answer in one word.\n")
    with script.open("rb") as typed:
        process = subprocess.Popen(
            [sys.executable, "-m", "mistralrs_jax.cli", "--seed", "0", "--max-seqs", "1",
             "--max-num-batched-tokens", "64", "-i"],
            stdin=typed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    try:
        seen = b""
        marker = b"(temperature = 0.0)\n"
        while marker not in seen or len(seen.split(marker)[1]) < 40:  # the story has begun
            byte = process.stdout.read(1)
            assert byte, "the chat ended before the story began: " + process.stderr.read().decode()[-3000:]
            seen += byte
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err.decode()[-3000:]
    _story, stopped, after = rest.decode().partition("[stopped]")
    assert stopped, "the reply was not stopped: " + rest.decode()[-2000:]
    assert "Paris" in after, after
