"""One completion being generated: its tokens, its place in the KV cache, its state.

A request with ``n > 1`` becomes ``n`` sequences that share a ``request_id`` and differ
in ``index``. The scheduler moves a sequence between states, the block manager owns
``block_table`` / ``block_hashes``, the engine appends sampled tokens and decides
stop conditions. Nothing here touches JAX.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from ..sampling_params import SamplingParams, resolve_seed

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Evicted from the KV cache to free blocks; waits again and recomputes
    # prompt + output-so-far on re-admission.
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Sequence:
    """Token state of one completion.

    ``token_ids`` is a single list (prompt followed by output) that grows in place;
    treat it as read-only outside this class.

    KV bookkeeping: ``num_computed_tokens`` counts the leading tokens whose keys and
    values are in the cache. While decoding it equals ``num_tokens - 1``: the last
    sampled token is fed to the next step. After a preemption it drops to 0 and the
    whole prompt + output is recomputed.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        seed: int | None = None,
        arrival_time: float | None = None,
        prompt: str | None = None,
        cache_salt: Any = None,
        multimodal: Any = None,
    ):
        self.seq_id: int = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        # The u32 seed of this completion (sampling_params.resolve_seed): completion i of a
        # seeded request uses seed + i, so n seeded completions differ yet repeat across runs.
        self.seed: int = resolve_seed(params, index) if seed is None else seed & 0xFFFFFFFF
        self.prompt = prompt
        self.prompt_token_ids: list[int] = [int(token) for token in prompt_token_ids]
        self._token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        # Anything that changes the KV of identical tokens (a LoRA adapter, image
        # contents) must go in this hashable salt, or prefix caching would share
        # wrong blocks.
        self.cache_salt = cache_salt
        # Per-request LoRA: the adapter slot this sequence's tokens use (-1: the base model).
        # `params.lora` is a loaded adapter (loading/adapters/unmerged.LoadedAdapter); it
        # keeps its slot until this sequence finishes, and salts the prefix cache per load.
        self.lora_slot = -1
        lora = getattr(params, "lora", None)
        if lora is not None:
            lora.attach(self)
            self.lora_slot = int(lora.slot)
            self.cache_salt = (cache_salt, "lora", lora.key)
        # Image features for prompt positions (engine/multimodal.MultiModalInputs), or None.
        self.multimodal = multimodal

        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chain hashes of the leading full blocks of block_table (see BlockManager).
        self.block_hashes: list[int] = []
        # Tokens served from the prefix cache at the latest admission.
        self.num_cached_prefix_tokens = 0

        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: str | int | None = None  # the stop string or token id
        self.num_preemptions = 0
        # time.monotonic() stamps: durations between them are meaningful, not the values.
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    # -- tokens --------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        return self._token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    def append_token(self, token_id: int) -> None:
        self._token_ids.append(int(token_id))
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    # -- KV progress ---------------------------------------------------------------

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens that must still run through the model before the next one is sampled."""
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """One generated token left to feed: a plain decode step (not a (re)prefill)."""
        return self.num_output_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, index={self.index}, "
            f"status={self.status.name}, tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
