"""The paged KV cache's block pool: allocation, ref counts and prefix caching.

The device KV cache is an array of ``num_blocks`` blocks of ``block_size`` token slots.
Block 0 is the null block: padding tokens of a batch write their KV there, so it is
never handed to a sequence. A sequence's ``block_table`` maps its token position
``p`` to slot ``p % block_size`` of block ``block_table[p // block_size]``.

Prefix caching (hash chains, as in vLLM): once a block is full and its KV computed,
it is registered under ``hash((parent_hash, tokens_of_block))`` where ``parent_hash``
is the previous block's hash (for the first block, a root derived from the
sequence's ``cache_salt``). One hash therefore names the whole prefix up to the end
of its block. A new sequence walks its full prompt blocks along the chain and shares
every block found (ref count + 1) instead of recomputing it.

A block's life: free and clean -> held by sequences (ref count >= 1) -> when the last
holder lets go, either back to the clean list (no hash) or, if registered, *cached*:
free to reuse but still findable by hash. Cached blocks are kept in LRU order and
the least recently released is evicted (its hash dropped) when a new block is
needed and no clean one is left. A cache hit on a cached block takes it out of the
free pool again.

``prefix_cache_n`` (mistral.rs' ``--prefix-cache-n``) bounds how many released
sequences keep cached blocks: every ``free(seq)`` that leaves at least one block
cached opens a new *release generation* holding those blocks; when more than ``N``
generations still hold cached blocks, the oldest generation's blocks are dropped
from the hash table (they stay free, as clean blocks). A block belongs to the
generation of the sequence that released it last, so a shared system prompt stays
cached while recent sequences keep releasing it. ``None`` means no bound beyond the
pool size; ``0`` disables prefix caching.

Statistics are counted in tokens (``prefix_cache_queries``: tokens of sequences
looked up at admission, ``prefix_cache_hits``: tokens served from the cache) and in
blocks (``prefix_cache_block_queries``: full blocks that could have been shared,
``prefix_cache_block_hits``).
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable

from .kv_cache import NULL_BLOCK, PrefixCacheStats  # noqa: F401  (NULL_BLOCK: the pool's layout, documented above)
from .sequence import Sequence

logger = logging.getLogger(__name__)


class BlockManager:
    """The paged `kv_cache.KVCacheManager`."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        prefix_cache_n: int | None = None,
    ):
        """``num_blocks`` is the size of the device pool, null block included."""
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if prefix_cache_n is not None and prefix_cache_n < 0:
            raise ValueError(f"prefix_cache_n must be >= 0 or None, got {prefix_cache_n}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching and prefix_cache_n != 0
        self.prefix_cache_n = prefix_cache_n

        self._ref_counts = [0] * num_blocks
        # Registered hash of each block (None: not in the prefix cache) and the tokens
        # it holds, compared on lookup so a hash collision can never share wrong KV.
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._clean_free: deque[int] = deque(range(1, num_blocks))
        # Cached (hashed, ref count 0) blocks, least recently released first.
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        # Release generation of each cached block, and the cached blocks of each
        # generation (oldest first), for the prefix_cache_n bound.
        self._block_generation: list[int] = [0] * num_blocks
        self._generations: OrderedDict[int, set[int]] = OrderedDict()
        self._next_generation = 1
        self.stats = PrefixCacheStats()

    # -- sizes ---------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        """Blocks that can hold sequence data (the null block excluded)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are evictable)."""
        return len(self._clean_free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    @property
    def num_token_slots(self) -> int:
        return self.num_total_blocks * self.block_size

    @property
    def max_blocks_per_seq(self) -> int:
        """The most blocks one sequence can ever hold: the whole pool."""
        return self.num_total_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    def blocks_needed(self, num_token_slots: int) -> int:
        return -(-num_token_slots // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def cached_hash(self, block_id: int) -> int | None:
        """The prefix-cache hash a block is registered under, or None."""
        return self._block_hash[block_id]

    # -- allocation ----------------------------------------------------------------

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        slots = seq.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_needed(slots) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()) -> bool:
        """Would ``allocate_for`` succeed, after sharing ``cached_blocks`` (from
        ``find_cached_prefix``) as ``match_prefix`` would?"""
        cached_blocks = list(cached_blocks)
        slots = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_needed(slots) - len(seq.block_table) - len(cached_blocks)
        # Sharing a cached-but-free block takes it out of the free pool.
        taken = sum(1 for block in cached_blocks if self._ref_counts[block] == 0)
        return needed <= self.num_free_blocks - taken

    def allocate_for(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq.block_table`` to cover ``num_computed_tokens + num_new_tokens``
        slots. All or nothing: returns False and allocates nothing if the pool is short."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self._take_free_block()
            self._ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def num_tokens_fitting(self, seq: Sequence) -> int:
        """How many new tokens ``seq`` could run now without anyone being preempted."""
        held_slots = len(seq.block_table) * self.block_size - seq.num_computed_tokens
        return held_slots + self.num_free_blocks * self.block_size

    def _take_free_block(self) -> int:
        if self._clean_free:
            return self._clean_free.popleft()
        block, _ = self._cached_free.popitem(last=False)
        self._forget_generation(block)
        self._unregister(block)
        self.stats.evicted_blocks += 1
        return block

    # -- release -------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks. Blocks nobody holds any more become free;
        registered ones stay findable (cached) until evicted or dropped."""
        self.release_blocks(seq.block_table, owner=seq)
        seq.block_table = []
        seq.block_hashes = []

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past what ``seq``'s tokens need (after speculative decoding,
        those only rejected drafts used; none of them is in the prefix cache)."""
        keep = self.blocks_needed(seq.num_tokens)
        if len(seq.block_table) > keep:
            self.release_blocks(seq.block_table[keep:], owner=seq)
            del seq.block_table[keep:]

    def release_blocks(self, blocks: list[int], owner: object = None) -> None:
        """Drop one hold on each of `blocks` (a block table or its tail, in table order)."""
        newly_cached = []
        # Tail first, so a sequence's last blocks are the first to be evicted: a
        # block is useless without the blocks before it in its chain.
        for block in reversed(blocks):
            count = self._ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} released more often than taken ({owner!r})")
            self._ref_counts[block] = count
            if count == 0:
                if self._block_hash[block] is None:
                    self._clean_free.append(block)
                else:
                    self._cached_free[block] = None
                    newly_cached.append(block)
        if newly_cached:
            generation = self._next_generation
            self._next_generation += 1
            self._generations[generation] = set(newly_cached)
            for block in newly_cached:
                self._block_generation[block] = generation
            self._enforce_prefix_cache_n()

    def _enforce_prefix_cache_n(self) -> None:
        if self.prefix_cache_n is None:
            return
        while len(self._generations) > self.prefix_cache_n:
            _, blocks = self._generations.popitem(last=False)
            for block in blocks:
                del self._cached_free[block]
                self._unregister(block)
                self._block_generation[block] = 0
                self._clean_free.append(block)
                self.stats.dropped_blocks += 1

    def _forget_generation(self, block: int) -> None:
        generation = self._block_generation[block]
        if generation:
            blocks = self._generations[generation]
            blocks.discard(block)
            if not blocks:
                del self._generations[generation]
            self._block_generation[block] = 0

    def _unregister(self, block: int) -> None:
        block_hash = self._block_hash[block]
        if block_hash is not None:
            if self._hash_to_block.get(block_hash) == block:
                del self._hash_to_block[block_hash]
            self._block_hash[block] = None
            self._block_tokens[block] = None

    # -- prefix cache --------------------------------------------------------------

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (vLLM's ``reset_prefix_cache``), e.g. to measure
        without the cache. Cached free blocks become clean; blocks in use stay with their
        sequences but are no longer shared with new ones. Returns the blocks forgotten.
        Like every method here, call it from the engine loop thread or while it is idle."""
        forgotten = 0
        for block in range(1, self.num_blocks):
            if self._block_hash[block] is not None:
                self._unregister(block)
                forgotten += 1
            self._block_generation[block] = 0
        self._clean_free.extend(self._cached_free)
        self._cached_free.clear()
        self._generations.clear()
        return forgotten

    def _root_hash(self, seq: Sequence) -> int:
        return hash(("mistralrs_jax.prefix_root", seq.cache_salt))

    def _block_token_ids(self, seq: Sequence, block_index: int) -> tuple[int, ...]:
        start = block_index * self.block_size
        return tuple(seq.token_ids[start : start + self.block_size])

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache that hold ``seq``'s leading full blocks. Pure
        lookup: changes nothing, so a scheduler may call it every step while a
        sequence waits. Never covers every token (the last one must run to give logits)."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        found = []
        parent = self._root_hash(seq)
        for index in range(max_blocks):
            tokens = self._block_token_ids(seq, index)
            block_hash = hash((parent, tokens))
            block = self._hash_to_block.get(block_hash)
            if block is None or self._block_tokens[block] != tokens:
                break
            found.append(block)
            parent = block_hash
        return found

    def match_prefix(self, seq: Sequence, cached_blocks: list[int] | None = None) -> int:
        """At admission (empty block table): share the cached blocks of ``seq``'s prefix.
        Sets ``block_table``, ``block_hashes``, ``num_computed_tokens`` and
        ``num_cached_prefix_tokens``; returns the number of cached tokens. Pass the
        result of ``find_cached_prefix`` from the same step to skip a second lookup."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"match_prefix needs a sequence with nothing computed ({seq!r})")
        if not self.enable_prefix_caching:
            seq.num_cached_prefix_tokens = 0
            return 0
        if cached_blocks is None:
            cached_blocks = self.find_cached_prefix(seq)
        self.stats.prefix_cache_queries += seq.num_tokens
        self.stats.prefix_cache_block_queries += (seq.num_tokens - 1) // self.block_size
        self.stats.prefix_cache_hits += len(cached_blocks) * self.block_size
        self.stats.prefix_cache_block_hits += len(cached_blocks)
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._cached_free[block]
                self._forget_generation(block)
            self._ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(self._block_hash[block])
        num_cached = len(cached_blocks) * self.block_size
        seq.num_computed_tokens = num_cached
        seq.num_cached_prefix_tokens = num_cached
        return num_cached

    def commit_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """After a step: register ``seq``'s blocks that are now full and computed, among its
        first `num_tokens` positions (default: ``num_computed_tokens``)."""
        if not self.enable_prefix_caching:
            return
        num_full = (seq.num_computed_tokens if num_tokens is None else num_tokens) // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else self._root_hash(seq)
        for index in range(len(seq.block_hashes), num_full):
            tokens = self._block_token_ids(seq, index)
            block_hash = hash((parent, tokens))
            seq.block_hashes.append(block_hash)
            block = seq.block_table[index]
            # Another sequence may have computed the same block first; keep its entry
            # and leave this copy unregistered (it returns to the clean list on free).
            if block_hash not in self._hash_to_block and self._block_hash[block] is None:
                self._hash_to_block[block_hash] = block
                self._block_hash[block] = block_hash
                self._block_tokens[block] = tokens
            parent = block_hash
