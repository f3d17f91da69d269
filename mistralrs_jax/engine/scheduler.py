"""Continuous batching: each step decides ``{sequence: tokens to run}``.

Prefill chunks and decode tokens share one ragged batch (vLLM v1's model). A step:

1. RUNNING sequences, oldest arrival first: each gets what it still has to compute
   (1 token when decoding, the rest of its prompt when prefilling), capped by the
   step's token budget and ``long_prefill_token_threshold``. When the pool has no
   block for it, a prefill chunk first shrinks to what fits; otherwise the most
   recently arrived running sequence is preempted (blocks freed, recompute later),
   repeatedly, possibly the sequence itself.
2. If nobody was preempted, WAITING sequences are admitted first-come first-served
   (preempted ones sit at the front of the queue) while fewer than ``max_num_seqs``
   run, the budget lasts and the pool can hold their first chunk. Admission shares
   cached prefix blocks. The queue is never skipped: if its head does not fit, the
   ones behind it wait too.

Preemption by recompute keeps the output tokens; on re-admission the sequence
recomputes prompt + output so far and samples the next token from the same context
it would have seen, so its final output does not change.

No livelock: the oldest running sequence is only preempted by itself when it is
alone, which cannot happen while it fits the pool; a sequence whose tokens need more
blocks than the whole pool can never run again and is finished with ``"length"``
(reported in ``SchedulerOutput.finished_over_capacity``).

Speculative decoding (vLLM v1's lookahead slots): with ``num_lookahead_tokens`` = gamma,
every sequence whose chunk completes its known tokens also gets the KV slots for up to
gamma draft tokens (fewer near ``max_tokens`` or ``max_model_len``, or when the pool is
short; never by preempting anyone), listed in ``SchedulerOutput.lookahead``. Nothing
else allocates blocks. After the step, ``update_after_step`` appends each sequence's
accepted tokens and gives back the blocks only rejected drafts used.

Stops: `check_stop` is the one rule for token-level ends (EOS, ``stop_token_ids``,
``max_tokens``, ``max_model_len``); ``update_after_step`` applies it after every
appended token, so a speculative run ends at the first stop. Stop *strings* are text,
which the engine sees (it finishes the sequence through `finish`).

The block manager is a `kv_cache.KVCacheManager`: the paged `BlockManager` or, for
``--no-paged-attn``, the `ContiguousBlockManager` (one fixed slot per sequence);
``max_blocks_per_seq`` is the whole pool for the first and one slot for the second.

Not thread-safe: call every method from the engine loop thread.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Collection, Mapping
from collections.abc import Sequence as TokenList
from dataclasses import dataclass, field

from ..errors import InvalidRequestError, PromptTooLongError
from .kv_cache import KVCacheManager
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# finish reasons (OpenAI's names).
STOP = "stop"
LENGTH = "length"
ABORT = "abort"


@dataclass
class SchedulerOutput:
    # (sequence, tokens to run this step): running sequences oldest first, then the ones
    # admitted this step. (The runner lays one-token runs out first; see runner.decode_first.)
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Finished with "length" by the scheduler during this step: their tokens need more KV
    # than the pool (or their slot) can ever hold. The engine reports them like any finished one.
    finished_over_capacity: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Speculative decoding: seq_id -> draft tokens whose KV slots this step allocated.
    lookahead: dict[int, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_scheduled_seqs(self) -> int:
        return len(self.scheduled)


def _arrival_key(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    def __init__(
        self,
        block_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: int = 0,
        eos_token_ids: Collection[int] = (),
        num_lookahead_tokens: int = 0,
    ):
        """``long_prefill_token_threshold`` > 0 caps the tokens one sequence may run in
        a step, so a long prompt cannot take the whole budget from its neighbours.
        ``eos_token_ids`` end a sequence (unless its request ignores EOS);
        ``num_lookahead_tokens`` > 0 reserves draft slots for speculative decoding."""
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {max_num_batched_tokens}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: raise max_num_batched_tokens "
                f"({max_num_batched_tokens}) to max_model_len ({max_model_len}) or enable chunked prefill"
            )
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {long_prefill_token_threshold}")
        if num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens must be >= 0, got {num_lookahead_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.num_lookahead_tokens = num_lookahead_tokens

        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival (oldest first)
        self._by_request: dict[str, list[Sequence]] = {}
        self.num_preempted_total = 0
        # While the runner compiles its larger step shapes in the background: the largest step
        # (tokens) compiled so far. Steps stay within it, and so do the running sequences (one
        # token each at least), so a prefill is chunked and no step waits on a compile. None: no cap.
        self.step_token_cap: int | None = None

    # -- queue -----------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        """Raise if a prompt of this length could never be served. Depends only on
        configuration, so it is safe to call from any thread before ``add``."""
        if num_prompt_tokens < 1:
            raise InvalidRequestError("the prompt is empty: send at least one token", param="prompt")
        if num_prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens but the model's context is {self.max_model_len} "
                f"tokens, which leaves no room to generate: shorten the prompt"
            )
        slots = self.block_manager.max_blocks_per_seq * self.block_manager.block_size
        if num_prompt_tokens >= slots:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens but the KV cache holds only {slots - 1} tokens of one "
                f"sequence: shorten the prompt or give the KV cache more memory"
            )

    def add(self, seq: Sequence) -> None:
        self.check_prompt_fits(seq.num_prompt_tokens)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every still unfinished sequence of a request with ``"abort"``, free
        their blocks now and return them. Unknown or finished requests return []."""
        seqs = list(self._by_request.get(request_id, ()))
        for seq in seqs:
            self.finish(seq, ABORT)
        return seqs

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """End ``seq`` (whatever its state), free its blocks and forget it. On a
        sequence already finished (e.g. by ``max_model_len``) it only replaces the
        reasons, so the engine can report "stop" when the last token was also a stop."""
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_time = time.monotonic()
        siblings = self._by_request[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._by_request[seq.request_id]

    # -- one step --------------------------------------------------------------------

    def _chunk_size(self, seq: Sequence, num_uncomputed: int, budget: int) -> int:
        """Tokens ``seq`` may run this step (0: wait for a later step)."""
        num_new = num_uncomputed
        if self.long_prefill_token_threshold:
            num_new = min(num_new, self.long_prefill_token_threshold)
        if num_new > budget and not self.enable_chunked_prefill:
            return 0
        return min(num_new, budget)

    def _exceeds_pool(self, seq: Sequence) -> bool:
        """``seq`` cannot run to its next token even with the whole pool (or, without
        paged attention, its whole slot) to itself."""
        return self.block_manager.blocks_needed(seq.num_tokens) > self.block_manager.max_blocks_per_seq

    def _finish_over_capacity(self, seq: Sequence, output: SchedulerOutput) -> None:
        logger.warning(
            "finishing %r with 'length': its %d tokens need more than the KV cache holds for one sequence "
            "(%d tokens)", seq, seq.num_tokens, self.block_manager.max_blocks_per_seq * self.block_manager.block_size,
        )
        self.finish(seq, LENGTH)
        output.finished_over_capacity.append(seq)

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preempted_total += 1
        self.waiting.appendleft(seq)
        output.preempted.append(seq)
        logger.debug("preempted %r", seq)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        chosen: dict[Sequence, int] = {}
        cap = self.step_token_cap  # read once: the compile thread may raise it meanwhile
        max_tokens = self.max_num_batched_tokens if cap is None else min(cap, self.max_num_batched_tokens)
        max_seqs = self.max_num_seqs if cap is None else min(cap, self.max_num_seqs)
        budget = max_tokens
        block_manager = self.block_manager

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if self._exceeds_pool(seq):
                self._finish_over_capacity(seq, output)
                continue
            num_new = self._chunk_size(seq, seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                index += 1
                continue
            scheduled_self = True
            while not block_manager.allocate_for(seq, num_new):
                fitting = block_manager.num_tokens_fitting(seq)
                if self.enable_chunked_prefill and 0 < fitting < num_new:
                    num_new = fitting  # a smaller prefill chunk beats preempting someone
                    continue
                # The oldest running sequence never reaches here alone: then every
                # used block is its own, and _exceeds_pool would have fired.
                victim = self.running[-1]
                self._preempt(victim, output)
                if victim is seq:
                    scheduled_self = False
                    break
            if not scheduled_self:
                break
            chosen[seq] = num_new
            budget -= num_new
            index += 1

        if not output.preempted:
            while self.waiting and len(self.running) < max_seqs and budget > 0:
                seq = self.waiting[0]
                if self._exceeds_pool(seq):
                    self._finish_over_capacity(seq, output)
                    continue
                cached_blocks = block_manager.find_cached_prefix(seq)
                num_uncomputed = seq.num_tokens - len(cached_blocks) * block_manager.block_size
                num_new = self._chunk_size(seq, num_uncomputed, budget)
                if num_new == 0 or not block_manager.can_allocate(seq, num_new, cached_blocks):
                    break
                self.waiting.popleft()
                block_manager.match_prefix(seq, cached_blocks)
                allocated = block_manager.allocate_for(seq, num_new)
                assert allocated, "can_allocate and allocate_for disagree"
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
                bisect.insort(self.running, seq, key=_arrival_key)
                chosen[seq] = num_new
                budget -= num_new

        output.scheduled = list(chosen.items())
        output.num_batched_tokens = max_tokens - budget
        if self.num_lookahead_tokens:
            self._reserve_lookahead(output)
        return output

    def _reserve_lookahead(self, output: SchedulerOutput) -> None:
        """Draft slots for every scheduled sequence whose chunk completes its known tokens: a
        step appends up to lookahead + 1 tokens, which must stay within max_tokens and
        max_model_len, and whose KV must fit the pool now (nobody is preempted for them)."""
        for seq, num_new in output.scheduled:
            if seq.num_computed_tokens + num_new != seq.num_tokens:
                continue  # a partial prefill chunk samples nothing
            lookahead = self.num_lookahead_tokens
            if seq.params.max_tokens is not None:
                lookahead = min(lookahead, seq.params.max_tokens - seq.num_output_tokens - 1)
            lookahead = min(lookahead, self.max_model_len - seq.num_tokens - 1,
                            self.block_manager.num_tokens_fitting(seq) - num_new)
            if lookahead > 0 and self.block_manager.allocate_for(seq, num_new + lookahead):
                output.lookahead[seq.seq_id] = lookahead

    def check_stop(self, seq: Sequence) -> tuple[str, int | None] | None:
        """(finish_reason, stop_reason) if ``seq`` ends with its last token, else None: EOS
        (unless ignored) or a stop token id -> "stop"; max_tokens or max_model_len -> "length"."""
        token = seq.last_token_id
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return STOP, token
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return LENGTH, None
        if seq.num_tokens >= self.max_model_len:
            return LENGTH, None
        return None

    def update_after_step(self, output: SchedulerOutput, sampled: Mapping[int, TokenList[int]],
                          cacheable: Mapping[int, int] | None = None) -> list[tuple[Sequence, list[int]]]:
        """Apply a step's results.

        Each scheduled sequence's ``num_computed_tokens`` advances over its chunk. A
        sequence whose known tokens are now all computed appends its new tokens
        (``sampled[seq_id]``: one sampled token, or the accepted draft tokens and the final
        one), one at a time until `check_stop` ends it (then it is finished here); a partial
        prefill chunk's sample is ignored. Newly full blocks go into the prefix cache, up to
        ``cacheable[seq_id]`` positions when given (speculative decoding: where the draft's
        KV is complete too), and blocks that only held rejected drafts go back to the pool.
        Returns (sequence, tokens appended) in batch order. Sequences aborted since
        ``schedule()`` are skipped."""
        appended = []
        for seq, num_new in output.scheduled:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            chunk_end = seq.num_computed_tokens + num_new
            tokens, stop = [], None
            if chunk_end == seq.num_tokens:
                try:
                    new_tokens = sampled[seq.seq_id]
                except KeyError:
                    raise RuntimeError(f"no sampled token for {seq!r}, whose prompt was completed this step") from None
                for token in new_tokens:
                    seq.append_token(token)
                    tokens.append(int(token))
                    stop = self.check_stop(seq)
                    if stop is not None:
                        break
                # Every appended token but the last had its KV written (as a draft the target ran).
                seq.num_computed_tokens = min(chunk_end + len(new_tokens) - 1, seq.num_tokens)
            else:
                seq.num_computed_tokens = chunk_end
            limit = seq.num_computed_tokens if cacheable is None else min(seq.num_computed_tokens,
                                                                          cacheable[seq.seq_id])
            self.block_manager.commit_full_blocks(seq, limit)
            if stop is not None:
                self.finish(seq, *stop)
            elif seq.seq_id in output.lookahead:
                self.block_manager.trim(seq)
            if tokens:
                appended.append((seq, tokens))
        return appended
