"""What the scheduler and the engine need of a KV cache's bookkeeping (`KVCacheManager`).

The device cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots (the
runner owns the arrays); a manager hands blocks to sequences (``seq.block_table``) and
takes them back. Two implement it: `block_manager.BlockManager` (paged, shared blocks,
prefix caching) and `contiguous_cache.ContiguousBlockManager` (``--no-paged-attn``: one
fixed slot per sequence, nothing shared). Block 0 is the null block in both: padding
tokens write their KV there, so it is never handed out.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .sequence import Sequence

NULL_BLOCK = 0


@dataclass
class PrefixCacheStats:
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0  # tokens
    prefix_cache_block_queries: int = 0
    prefix_cache_block_hits: int = 0
    evicted_blocks: int = 0  # cached blocks reused for new data (LRU)
    dropped_blocks: int = 0  # cached blocks dropped by the prefix_cache_n bound

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@runtime_checkable
class KVCacheManager(Protocol):
    """Block bookkeeping of one KV pool. Not thread-safe: the engine loop thread calls it."""

    block_size: int
    num_blocks: int  # the device pool's blocks, the null block included
    stats: PrefixCacheStats

    @property
    def num_total_blocks(self) -> int:
        """Blocks that can hold sequence data (the null block excluded)."""

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_used_blocks(self) -> int: ...

    @property
    def num_token_slots(self) -> int:
        """Token slots of the whole pool (null block excluded)."""

    @property
    def max_blocks_per_seq(self) -> int:
        """The most blocks one sequence can ever hold."""

    def blocks_needed(self, num_token_slots: int) -> int: ...

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()) -> bool:
        """Would `allocate_for` succeed after sharing `cached_blocks` (from `find_cached_prefix`)?"""

    def allocate_for(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Cover ``num_computed_tokens + num_new_tokens`` slots of `seq`; all or nothing."""

    def num_tokens_fitting(self, seq: Sequence) -> int:
        """New tokens `seq` could run now without anyone being preempted."""

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on all its blocks."""

    def trim(self, seq: Sequence) -> None:
        """Give back blocks past what `seq`'s tokens need (slots of rejected draft tokens)."""

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding `seq`'s leading full blocks (a pure lookup)."""

    def match_prefix(self, seq: Sequence, cached_blocks: list[int] | None = None) -> int:
        """At admission: share the cached prefix blocks; returns the tokens they cover."""

    def commit_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Register `seq`'s full blocks among its first `num_tokens` (default: its computed
        tokens) in the prefix cache."""

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns the blocks forgotten."""
