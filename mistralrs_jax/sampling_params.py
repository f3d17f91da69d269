"""Per-request generation settings (vLLM's names and defaults)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError

# DRY's default sequence breakers (llama.cpp's and mistral.rs'): a repeat never spans one of these.
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
# Temperatures below this are greedy (as in vLLM): dividing by them would overflow.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # OpenAI semantics, output tokens only
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token + top-k
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # DRY ("don't repeat yourself", llama.cpp / mistral.rs): off while dry_multiplier is 0.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: list[str] | None = None  # None: DEFAULT_DRY_SEQUENCE_BREAKERS
    # A grammar the output must match (mistralrs_jax/guidance.py), applied as a token mask.
    guided_decoding: Any = None  # a guidance.GuidedDecoding (a plain value here: guidance sits above this module)
    # Per-request LoRA (--lora-mode dynamic): the loaded adapter to apply, as LLM / the server
    # resolve it from a name (a loading.adapters.unmerged.LoadedAdapter; None: the base model).
    lora: Any = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        """Greedy decoding (the argmax), as the sampler decides it."""
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        def bad(param: str, message: str):
            raise InvalidRequestError(message, param=param)

        if not isinstance(self.n, int) or self.n < 1 or self.n > 128:
            bad("n", f"n must be an integer in [1, 128], got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            bad("temperature", f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= float(self.min_p) <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        if not 0.0 < float(self.repetition_penalty) <= 10.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if not -2.0 <= float(self.presence_penalty) <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2.0 <= float(self.frequency_penalty) <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            bad("logprobs", f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                bad("logit_bias", f"logit_bias has more than {MAX_LOGIT_BIAS_ENTRIES} entries")
            for token, bias in self.logit_bias.items():
                if not -100.0 <= float(bias) <= 100.0:
                    bad("logit_bias", f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"seed must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", "stop entries must be non-empty strings")
        if len(self.stop) > 16:
            bad("stop", "at most 16 stop strings are allowed")
        if not 0.0 <= float(self.dry_multiplier) <= 100.0:
            bad("dry_multiplier", f"dry_multiplier must be in [0, 100], got {self.dry_multiplier!r}")
        if not 1.0 <= float(self.dry_base) <= 100.0:
            bad("dry_base", f"dry_base must be in [1, 100], got {self.dry_base!r}")
        if not isinstance(self.dry_allowed_length, int) or self.dry_allowed_length < 1:
            bad("dry_allowed_length", f"dry_allowed_length must be a positive integer, got {self.dry_allowed_length!r}")
        if self.dry_sequence_breakers is not None and (
                not isinstance(self.dry_sequence_breakers, (list, tuple))
                or not all(isinstance(b, str) and b for b in self.dry_sequence_breakers)):
            bad("dry_sequence_breakers", "dry_sequence_breakers must be a list of non-empty strings")

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


def resolve_seed(params: SamplingParams | None, sequence_index: int = 0) -> int:
    """The u32 seed a sequence samples with; call once per sequence and store the result.

    A seeded request keeps its seed (the `n` parallel sequences get seed + index, as in
    vLLM, so they differ); seeds of any size (64-bit, negative) are folded into 32 bits
    by xor of their halves, so every seed below 2**32 is used as it is. An unseeded one
    draws a fresh random seed.
    """
    if params is None or params.seed is None:
        return secrets.randbits(32)
    seed = (params.seed + sequence_index) & 0xFFFFFFFFFFFFFFFF
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF
