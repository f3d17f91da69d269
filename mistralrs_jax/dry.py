"""DRY ("don't repeat yourself") sampling, as mistral.rs and llama.cpp define it, as logit biases.

For the next token, DRY looks for earlier places where the sequence's last token occurred. Where the
tokens before such a place match the tokens before the end of the sequence for `n` tokens (counting
the last token itself), the token that followed that place would extend a repeat of length `n`. Every
such token whose longest repeat reaches `allowed_length` gets `multiplier * base ** (n - allowed_length)`
subtracted from its logit. A sequence breaker stops a match: a match never runs across a breaker
(nothing is penalized right after one), and a breaker is never penalized. Breakers are given as
strings and become token ids the way mistral.rs turns them: the last token of `"a" + breaker`
(llama.cpp also counts every token whose text contains a breaker). Matches are capped at MAX_MATCH tokens
(mistral.rs' cap against quadratic work) and look at the whole prompt and output.

The host computes these penalties per row each step (a few token ids per row) and the sampler adds
them with the logit bias (engine/sampler.py): a fixed-shape array, so no compile. Unlike llama.cpp,
which applies DRY after the repetition penalties, they are added before them with the logit bias.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import math

import numpy as np

from .sampling_params import DEFAULT_DRY_SEQUENCE_BREAKERS, MAX_LOGIT_BIAS_ENTRIES, SamplingParams

MAX_MATCH = 50
_F32_MAX_LOG = 88.7228391


def dry_penalties(tokens: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  breakers: set[int] | frozenset[int] = frozenset(), max_match: int = MAX_MATCH) -> dict[int, float]:
    """{token id: penalty to subtract from its logit} for the token after `tokens`."""
    if multiplier == 0.0 or len(tokens) < 2:
        return {}
    ids = np.asarray(tokens, np.int64)
    n = len(ids)
    last = ids[-1]
    if int(last) in breakers:  # a repeat restarts after a breaker (llama.cpp's rule)
        return {}
    longest: dict[int, int] = {}
    for i in np.flatnonzero(ids[:-1] == last).tolist():
        following = int(ids[i + 1])
        if following in breakers:
            continue
        length = 1
        while length < max_match and length <= i:
            previous = int(ids[n - 1 - length])
            if int(ids[i - length]) != previous or previous in breakers:
                break
            length += 1
        if length > longest.get(following, 0):
            longest[following] = length
    # As llama.cpp: the exponent is clamped so the penalty stays a finite f32.
    max_exponent = int(_F32_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    return {token: multiplier * base ** min(length - allowed_length, max_exponent or length)
            for token, length in longest.items() if length >= allowed_length}


class DryBreakers:
    """Sequence-breaker strings -> token ids for one tokenizer (cached per breaker list)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[tuple[str, ...], frozenset[int]] = {}

    def ids(self, breakers: Sequence[str] | None) -> frozenset[int]:
        key = tuple(breakers if breakers is not None else DEFAULT_DRY_SEQUENCE_BREAKERS)
        found = self._cache.get(key)
        if found is None:
            found = frozenset(ids[-1] for ids in (self._tokenizer.encode("a" + text, add_special_tokens=False)
                                                   for text in key) if ids)
            self._cache[key] = found
        return found

    def penalties(self, params: SamplingParams, tokens: Sequence[int]) -> dict[int, float]:
        """The row's DRY penalties, at most as many as the logit-bias width leaves room for (largest first)."""
        if not params.dry_multiplier:
            return {}
        found = dry_penalties(tokens, params.dry_multiplier, params.dry_base, params.dry_allowed_length,
                              self.ids(params.dry_sequence_breakers))
        room = MAX_LOGIT_BIAS_ENTRIES - len(params.logit_bias or {})
        if len(found) > room:
            found = dict(sorted(found.items(), key=lambda item: -item[1])[:room])
        return found


def add_dry_bias(arrays: Any, modes: Any, rows: list[dict[int, float]]) -> tuple[Any, Any]:
    """Append each row's DRY penalties (negated) to the sampler's logit-bias entries."""
    import dataclasses

    if not any(rows):
        return arrays, modes
    num_rows, width = arrays.bias_token_ids.shape
    used = (arrays.bias_token_ids >= 0).sum(axis=1)
    new_width = max(width, max(int(used[row]) + len(found) for row, found in enumerate(rows)))
    ids = np.full((num_rows, new_width), -1, np.int32)
    values = np.zeros((num_rows, new_width), np.float32)
    ids[:, :width], values[:, :width] = arrays.bias_token_ids, arrays.bias_values
    for row, found in enumerate(rows):
        start = int(used[row])
        ids[row, start:start + len(found)] = list(found)
        values[row, start:start + len(found)] = [-penalty for penalty in found.values()]
    return (dataclasses.replace(arrays, bias_token_ids=ids, bias_values=values),
            modes._replace(use_bias=True))
