"""Reference ("peer") implementations the tests compare the engine against.

Two peers, both written by other people and both reading the very same GGUF file:

- llama.cpp through ``llama-cpp-python``: greedy continuations (its own quantized
  kernels, so the reference for "does the engine pick the same tokens").
- Hugging Face ``transformers`` on torch CPU: teacher-forced logits (it dequantizes
  the GGUF to f32, so the reference for "does the engine compute the same numbers").

Loaded peers are cached per file: loading costs seconds, and several tests share them.
A peer that is not installed makes the calling test skip with a message that names the
missing package and the command that installs it (`require_peer`, `missing_peer`); in CI
that skip is a failure (tests/skip_policy.py). A test that cannot apply on this machine at
all (not a missing reference) says so with `not_applicable`, the one skip CI accepts.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import NoReturn

import numpy as np
import pytest

INSTALL_HINT = "pip install -e '.[peers]'"

# import name -> distribution name on PyPI: the reference packages of the `peers` extra
PEER_PACKAGES = {
    "llama_cpp": "llama-cpp-python",
    "torch": "torch",
    "transformers": "transformers",
    "accelerate": "accelerate",  # transformers loads GGUF files only with it installed
    "peft": "peft",
    "sentencepiece": "sentencepiece",
}


class MissingPeer(pytest.skip.Exception):
    """A reference (package, model wheel, llama.cpp's sdist) is missing: a skip, a failure in CI."""


class NotApplicable(pytest.skip.Exception):
    """The test cannot apply on this machine (not a missing reference): the one skip CI accepts."""


def missing_peer(reason: str) -> NoReturn:
    """Skip the calling test because a reference is missing; `reason` says what to install."""
    raise MissingPeer(msg=reason, _use_item_location=True)


def not_applicable(reason: str) -> NoReturn:
    """Skip the calling test because it cannot apply here (e.g. it needs a GPU)."""
    raise NotApplicable(msg=reason, _use_item_location=True)


def require_peer(module_name: str) -> ModuleType:
    """Import a peer package or skip the calling test, saying what to install."""
    package = PEER_PACKAGES.get(module_name, module_name)
    try:
        return importlib.import_module(module_name)
    except (ImportError, OSError) as exc:  # OSError: a llama.cpp shared library that fails to load
        missing_peer(f"peer package {package!r} is not importable ({exc}); install the peers with {INSTALL_HINT}")


# --------------------------------------------------------------------------- llama.cpp


@functools.lru_cache(maxsize=2)
def _llamacpp_model(gguf_path: str, n_ctx: int, n_threads: int):
    llama_cpp = require_peer("llama_cpp")
    return llama_cpp.Llama(
        model_path=gguf_path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        logits_all=False,
        verbose=False,
    )


def llamacpp_greedy(
    gguf_path: str | os.PathLike,
    prompt_token_ids: list[int],
    n_tokens: int,
    *,
    n_ctx: int = 1024,
    n_threads: int = 1,
) -> list[int]:
    """The first ``n_tokens`` tokens llama.cpp picks greedily after ``prompt_token_ids``.

    Pure argmax: temperature 0 selects llama.cpp's greedy sampler, and the repetition
    penalty is set to 1.0 because llama-cpp-python's default (1.1) would reweight tokens
    already seen. End-of-sequence tokens do not stop it (the caller compares against
    ``ignore_eos=True`` runs).

    One thread by default: ggml gives each output row to one thread, so the tokens do not
    depend on the thread count, while its spin-waiting threads slow down 10-25x on a CPU
    shared with other work (measured: 32 tokens in 1.4 s with 1 thread, 14-37 s with 2).
    """
    if len(prompt_token_ids) + n_tokens > n_ctx:
        raise ValueError(f"prompt ({len(prompt_token_ids)}) + {n_tokens} tokens exceed n_ctx={n_ctx}")
    model = _llamacpp_model(str(gguf_path), n_ctx, n_threads)
    model.reset()  # no KV reuse from an earlier prompt: every call starts from an empty cache
    generated: list[int] = []
    for token in model.generate(
        list(prompt_token_ids),
        temp=0.0,
        top_k=1,
        top_p=1.0,
        min_p=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
    ):
        generated.append(int(token))
        if len(generated) == n_tokens:
            break
    return generated


# --------------------------------------------------------------------------- transformers


@functools.lru_cache(maxsize=2)
def _transformers_model(gguf_path: str, dtype_name: str):
    torch = require_peer("torch")
    require_peer("accelerate")
    transformers = require_peer("transformers")
    extra = {}
    if hasattr(transformers, "GgufConfig"):
        # transformers >= 5 may keep GGUF blocks packed and run ggml kernels when the `kernels`
        # package is installed; the reference must be a plain dense model in the requested dtype.
        extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path),
        gguf_file=os.path.basename(gguf_path),
        dtype=getattr(torch, dtype_name),
        **extra,
    )
    model.eval()
    return model


def transformers_logits(
    gguf_path: str | os.PathLike, token_ids: list[int], dtype_name: str = "float32"
) -> np.ndarray:
    """Teacher-forced logits ``[len(token_ids), vocab]`` (f32) from transformers on the same GGUF.

    Row i is the distribution over the token after ``token_ids[: i + 1]``, like
    ``LLM.score``. transformers dequantizes every GGUF tensor to ``dtype_name`` at load.
    """
    torch = require_peer("torch")
    model = _transformers_model(os.fspath(gguf_path), dtype_name)
    with torch.inference_mode():
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long)
        logits = model(input_ids=input_ids).logits[0]
    return logits.float().numpy()
