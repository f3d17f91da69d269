"""The `--no-paged-attn` KV cache: one fixed, contiguous slot of blocks per sequence.

Without paged attention a serving engine gives each running sequence a private,
contiguous KV buffer as long as the model's context. Here that buffer is a range of
blocks of the same device pool the paged path uses: slot ``i`` owns blocks
``1 + i * slot_blocks`` .. ``(i + 1) * slot_blocks`` (block 0 stays the null block
padding tokens write into). A sequence's ``block_table`` is its whole slot, handed
out at admission, so the runner and the attention code see ordinary block tables
that merely happen to be contiguous ranges, and both paths give the same outputs.

What differs from `BlockManager`: no sharing and no prefix cache; admission is limited
by free slots (there are as many slots as ``max_seqs``, so a sequence never waits for
memory and is never preempted); a sequence can never grow past its slot, so the
scheduler's ``max_model_len`` must not exceed ``slot_tokens`` and a sequence reaching it
finishes with ``"length"``.

Both implement `kv_cache.KVCacheManager`, the interface the scheduler and the engine use.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from .kv_cache import NULL_BLOCK, PrefixCacheStats
from .sequence import Sequence

logger = logging.getLogger(__name__)


def contiguous_pool_layout(num_slots: int, slot_tokens: int, block_size: int) -> tuple[int, int]:
    """(blocks in the device pool with the null block, blocks per slot) for ``num_slots``
    slots of at least ``slot_tokens`` tokens each."""
    if num_slots < 1:
        raise ValueError(f"the contiguous KV cache needs at least one slot, got {num_slots}")
    slot_blocks = math.ceil(slot_tokens / block_size)
    if slot_blocks < 1:
        raise ValueError(f"a KV cache slot must hold at least one token, got {slot_tokens}")
    return num_slots * slot_blocks + 1, slot_blocks


class ContiguousBlockManager:
    def __init__(self, num_slots: int, slot_blocks: int, block_size: int):
        if num_slots < 1 or slot_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_slots, slot_blocks and block_size must be positive, got {num_slots}, {slot_blocks}, {block_size}")
        self.num_slots = num_slots
        self.slot_blocks = slot_blocks
        self.block_size = block_size
        self.num_blocks = num_slots * slot_blocks + 1  # the null block included, as in BlockManager
        self.enable_prefix_caching = False
        self.prefix_cache_n = 0
        self.stats = PrefixCacheStats()  # stays zero: nothing is ever shared
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._slot_of: dict[int, int] = {}  # seq_id -> slot

    # -- sizes ---------------------------------------------------------------------

    @property
    def slot_tokens(self) -> int:
        return self.slot_blocks * self.block_size

    @property
    def num_total_blocks(self) -> int:
        return self.num_slots * self.slot_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks of slots no sequence holds (a held slot is reserved in full)."""
        return len(self._free_slots) * self.slot_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return 0

    @property
    def num_token_slots(self) -> int:
        return self.num_total_blocks * self.block_size

    @property
    def max_blocks_per_seq(self) -> int:
        """The most blocks one sequence can ever hold: its slot."""
        return self.slot_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    def blocks_needed(self, num_token_slots: int) -> int:
        return -(-num_token_slots // self.block_size)

    def slot_range(self, slot: int) -> list[int]:
        first = 1 + slot * self.slot_blocks
        return list(range(first, first + self.slot_blocks))

    def ref_count(self, block_id: int) -> int:
        if block_id == NULL_BLOCK:
            return 0
        return 0 if (block_id - 1) // self.slot_blocks in self._free_slots else 1

    def cached_hash(self, block_id: int) -> None:
        return None

    # -- allocation ----------------------------------------------------------------

    def _fits_slot(self, seq: Sequence, num_new_tokens: int) -> bool:
        return seq.num_computed_tokens + num_new_tokens <= self.slot_tokens

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return 0 if seq.seq_id in self._slot_of else self.slot_blocks

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()) -> bool:
        if not self._fits_slot(seq, num_new_tokens):
            return False
        return seq.seq_id in self._slot_of or bool(self._free_slots)

    def allocate_for(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` a slot if it has none. False (nothing taken) when no slot is
        free or the tokens would run past the end of its slot."""
        if not self.can_allocate(seq, num_new_tokens):
            return False
        if seq.seq_id not in self._slot_of:
            slot = self._free_slots.pop()
            self._slot_of[seq.seq_id] = slot
            seq.block_table = self.slot_range(slot)
        return True

    def num_tokens_fitting(self, seq: Sequence) -> int:
        if seq.seq_id in self._slot_of or self._free_slots:
            return self.slot_tokens - seq.num_computed_tokens
        return 0

    # -- release -------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Give ``seq``'s slot back (a sequence without one is left as it is)."""
        slot = self._slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        seq.block_table = []
        seq.block_hashes = []

    def trim(self, seq: Sequence) -> None:
        """Nothing to give back: a slot belongs to its sequence for its whole life."""

    # -- prefix cache (absent) -----------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        return []

    def match_prefix(self, seq: Sequence, cached_blocks: list[int] | None = None) -> int:
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"match_prefix needs a sequence with nothing computed ({seq!r})")
        seq.num_cached_prefix_tokens = 0
        return 0

    def commit_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        pass

    def reset_prefix_cache(self) -> int:
        return 0
