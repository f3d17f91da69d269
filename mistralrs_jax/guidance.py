"""Constrained decoding with llguidance (the library mistral.rs uses): grammars, matchers, masks.

A constrained sequence carries an `llguidance.LLMatcher` that follows its output tokens. Before
each sampling step the host asks every constrained row's matcher which tokens may come next and
writes the answer as one bit per token into a fixed-shape int32 array `[S, ceil(V / 32)]`
(all ones for free rows). The on-device sampler takes that array as one more input, so a
constraint never changes a compiled shape (`engine/sampler.py` applies it as -inf logits).
The runner fills the array while the device runs the model forward of the same step.

What a constraint may be (`GuidedDecoding.kind`):
- `json_schema`: a JSON Schema (OpenAI `response_format` json_schema, mistral.rs `grammar` json_schema);
- `json_object`: any JSON object (OpenAI `response_format` json_object);
- `regex`, `lark`: a regular expression or a Lark grammar (llguidance's dialect, which embeds JSON
  schemas with `%json {...}`);
- `llguidance`: llguidance's own JSON grammar format, as a dict or its JSON text.

JSON output is compact apart from one space after `,` and `:` (`{"a": 1, "b": [2, 3]}`): free
whitespace lets small models pad forever.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .errors import InvalidRequestError, NotSupportedError

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "lark", "llguidance")
# llguidance's thread-pool fill pays off only with cores to spare: on a busy 2-core machine 16 rows
# took 5.1-5.7 ms a step through the pool against 1.1-1.6 ms one after another.
PARALLEL_FILL_MIN_CPUS = 8
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# Separators of constrained JSON (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GuidedDecoding:
    """What a sequence's output must match. `param` names the request field it came from, for errors."""

    kind: str
    value: Any = None
    param: str = "grammar"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidRequestError(f"{self.param}: unknown constraint type {self.kind!r}; use one of "
                                      f"{', '.join(KINDS)}", param=self.param)

    def grammar(self) -> str:
        """The llguidance grammar (its JSON text); raises InvalidRequestError for a malformed value."""
        import llguidance

        kind, value = self.kind, self.value
        try:
            if kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
            if kind == "json_schema":
                if isinstance(value, str):
                    value = json.loads(value)
                if not isinstance(value, dict):
                    raise InvalidRequestError(f"{self.param}: a JSON schema must be an object, got "
                                              f"{type(value).__name__}", param=self.param)
                return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
            if kind in ("regex", "lark"):
                if not isinstance(value, str) or not value:
                    raise InvalidRequestError(f"{self.param}: a {kind} constraint needs its text as a non-empty "
                                              "string", param=self.param)
                if kind == "regex":
                    return llguidance.LLMatcher.grammar_from_regex(value)
                return llguidance.LLMatcher.grammar_from_lark(value)
            grammar = json.loads(value) if isinstance(value, str) else value  # kind == "llguidance"
            if not isinstance(grammar, dict):
                raise InvalidRequestError(f"{self.param}: an llguidance grammar must be a JSON object",
                                          param=self.param)
            return json.dumps(grammar)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            raise InvalidRequestError(f"{self.param}: cannot read the {kind} constraint: {exc}",
                                      param=self.param) from None


def _llg_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]):
    """An llguidance tokenizer over the engine's: its `tokenizers` JSON (a Hugging Face file, or the
    one rebuilt from GGUF metadata), widened to the model's vocabulary (padding ids are never allowed)."""
    import llguidance

    backend = getattr(tokenizer, "backend", tokenizer)
    eos = sorted({int(i) for i in eos_token_ids if 0 <= int(i) < vocab_size})
    if backend.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise NotSupportedError(f"constrained output needs the tokenizer to fit the model's vocabulary: it has "
                                f"{backend.get_vocab_size(with_added_tokens=True)} tokens, the model {vocab_size}")
    try:
        return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos or None)
    except ValueError as exc:
        raise NotSupportedError(f"constrained output is not available for this model: llguidance cannot read its "
                                f"tokenizer ({exc})") from None


class ConstraintTracker:
    """The matchers of an engine's constrained sequences, and the bitmask of one step.

    `compile()` runs on the caller's thread (it may take milliseconds for a big schema);
    everything else runs on the engine loop thread.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = set(eos_token_ids)
        self._llg = None
        self._lock = threading.Lock()
        self._executor = None
        self._matchers: dict[int, Any] = {}
        self._free_rows: dict[int, np.ndarray] = {}
        self.mask_seconds = 0.0  # host time spent filling masks (benchmarks read it)
        self.mask_steps = 0
        self._dry = None

    @property
    def words(self) -> int:
        """Width of one mask row in int32 words."""
        return math.ceil(self.vocab_size / 32)

    @property
    def active(self) -> bool:
        return bool(self._matchers)

    def llg_tokenizer(self):
        with self._lock:  # built once, on the first constrained request (about a second for 50k tokens)
            if self._llg is None:
                self._llg = _llg_tokenizer(self._tokenizer, self.vocab_size, self._eos)
            return self._llg

    def compile(self, guided: GuidedDecoding, count: int) -> list[Any]:
        """`count` fresh matchers for `guided`; InvalidRequestError naming the problem if it does not compile."""
        import llguidance

        grammar = guided.grammar()
        tokenizer = self.llg_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InvalidRequestError(f"{guided.param}: the {guided.kind} constraint does not compile: "
                                      f"{_first_line(messages[0])}", param=guided.param, code="invalid_grammar")
        first = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if first.is_error():
            raise InvalidRequestError(f"{guided.param}: the {guided.kind} constraint does not compile: "
                                      f"{_first_line(first.get_error())}", param=guided.param,
                                      code="invalid_grammar")
        return [first] + [first.deep_copy() for _ in range(count - 1)]

    def register(self, seq_id: int, matcher: Any) -> None:
        self._matchers[seq_id] = matcher

    def release(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)

    def clear(self) -> None:
        self._matchers.clear()

    def is_constrained(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def free_rows(self, num_rows: int) -> np.ndarray:
        """The all-ones mask of `num_rows` rows (cached: the runner keeps a device copy per shape)."""
        mask = self._free_rows.get(num_rows)
        if mask is None:
            mask = self._free_rows[num_rows] = np.full((num_rows, self.words), -1, np.int32)
        return mask

    def bitmask(self, seq_ids: list[int], num_rows: int) -> np.ndarray | None:
        """int32[num_rows, words]: row i allows the tokens seq_ids[i]'s matcher allows next; rows of
        free sequences and padding allow everything. None when no row is constrained."""
        import time

        import llguidance.numpy as llg_numpy

        rows = [(self._matchers[sid], row) for row, sid in enumerate(seq_ids) if sid in self._matchers]
        if not rows:
            return None
        start = time.perf_counter()
        mask = np.full((num_rows, self.words), -1, np.int32)
        if len(rows) < 4 or _CPUS < PARALLEL_FILL_MIN_CPUS:
            for matcher, row in rows:
                llg_numpy.fill_next_token_bitmask(matcher, mask, row)
        else:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            llg_numpy.fill_next_token_bitmask_par(self._executor, rows, mask)
        self.mask_seconds += time.perf_counter() - start
        self.mask_steps += 1
        return mask

    def dry_rows(self, seqs: list[Any]) -> list[dict[int, float]]:
        """Each sequence's DRY penalties for its next token (dry.py); {} for rows without DRY.
        DRY is host-side work of the same kind as the masks, so the runner gets both from here."""
        if not any(seq.params.dry_multiplier for seq in seqs):
            return []
        if self._dry is None:
            from .dry import DryBreakers

            self._dry = DryBreakers(self._tokenizer)
        return [self._dry.penalties(seq.params, seq.token_ids) for seq in seqs]

    def advance(self, seq_id: int, token: int) -> str | None:
        """Feed a sampled token to the sequence's matcher. Returns None while the constraint goes on,
        "done" once it is complete (the sequence should stop), "error" if the token broke it."""
        matcher = self._matchers.get(seq_id)
        if matcher is None:
            return None
        if not matcher.consume_token(int(token)):
            log.warning("constrained sequence %d: token %d was refused by its grammar (%s); stopping it",
                        seq_id, token, _first_line(matcher.get_error()))
            return "error"
        return "done" if matcher.is_stopped() else None


def _first_line(message: str) -> str:
    message = (message or "unknown error").strip()
    return message.splitlines()[0] if message else "unknown error"
