"""BlockManager: block accounting, hash-chained prefix sharing, LRU eviction, prefix_cache_n;
ContiguousBlockManager: the fixed per-sequence slots of --no-paged-attn."""
import random

import pytest

from mistralrs_jax.engine.block_manager import NULL_BLOCK, BlockManager
from mistralrs_jax.engine.contiguous_cache import ContiguousBlockManager, contiguous_pool_layout
from mistralrs_jax.engine.sequence import Sequence
from mistralrs_jax.sampling_params import SamplingParams

BLOCK = 16
SYSTEM_PROMPT = list(range(1000, 1064))  # 64 tokens = 4 full blocks


def make_seq(tokens, salt=None) -> Sequence:
    return Sequence("req", list(tokens), SamplingParams(temperature=0.0), cache_salt=salt)


def admit_and_compute(manager: BlockManager, seq: Sequence) -> int:
    """What the scheduler and runner do for a whole prompt: share the cached prefix,
    allocate the rest, "run" it and register the full blocks. Returns cached tokens."""
    cached = manager.match_prefix(seq)
    assert manager.allocate_for(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.commit_full_blocks(seq)
    return cached


def assert_refcounts_match(manager: BlockManager, live: list[Sequence]) -> None:
    holders = [0] * manager.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block in seq.block_table:
            holders[block] += 1
    assert holders[NULL_BLOCK] == 0
    for block in range(1, manager.num_blocks):
        assert manager.ref_count(block) == holders[block]
    assert manager.num_free_blocks == sum(1 for b in range(1, manager.num_blocks) if holders[b] == 0)
    assert manager.num_free_blocks + manager.num_used_blocks == manager.num_total_blocks


def test_allocation_covers_slots_and_never_hands_out_the_null_block():
    manager = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    assert manager.num_total_blocks == 5 and manager.num_free_blocks == 5
    seq = make_seq(range(9))
    assert manager.allocate_for(seq, 9)
    assert len(seq.block_table) == 3 and NULL_BLOCK not in seq.block_table
    seq.num_computed_tokens = 9
    assert manager.allocate_for(seq, 3)  # slots 9..11 still fit block 3
    assert len(seq.block_table) == 3
    assert manager.allocate_for(seq, 4)  # slot 12 opens a 4th block
    assert len(seq.block_table) == 4
    assert manager.num_used_blocks == 4

    other = make_seq(range(8))
    table_before = list(other.block_table)
    assert not manager.allocate_for(other, 8)  # needs 2, 1 left: nothing is taken
    assert other.block_table == table_before and manager.num_free_blocks == 1
    assert manager.allocate_for(other, 4)
    manager.free(seq)
    manager.free(other)
    assert manager.num_free_blocks == 5 and seq.block_table == []


def test_two_sequences_with_the_same_system_prompt_share_its_blocks():
    manager = BlockManager(num_blocks=32, block_size=BLOCK)
    first = make_seq(SYSTEM_PROMPT + [1, 2, 3])
    assert admit_and_compute(manager, first) == 0
    second = make_seq(SYSTEM_PROMPT + [7, 8, 9, 10, 11])
    assert admit_and_compute(manager, second) == 64
    assert second.num_cached_prefix_tokens == 64
    assert second.block_table[:4] == first.block_table[:4]
    assert second.block_table[4] != first.block_table[4]
    for block in first.block_table[:4]:
        assert manager.ref_count(block) == 2
    assert manager.stats.prefix_cache_hits == 64
    assert manager.stats.prefix_cache_block_hits == 4
    assert manager.stats.prefix_cache_queries == first.num_tokens + second.num_tokens
    assert_refcounts_match(manager, [first, second])

    manager.free(first)  # shared blocks stay held by `second`
    assert_refcounts_match(manager, [second])
    manager.free(second)
    assert manager.num_free_blocks == manager.num_total_blocks
    # Released but still cached: a third sequence hits without anyone running.
    third = make_seq(SYSTEM_PROMPT + [5])
    assert admit_and_compute(manager, third) == 64
    assert manager.stats.prefix_cache_hits == 128


def test_at_least_one_prompt_token_is_recomputed():
    manager = BlockManager(num_blocks=32, block_size=BLOCK)
    admit_and_compute(manager, make_seq(SYSTEM_PROMPT + [1]))
    exact = make_seq(SYSTEM_PROMPT)  # all 4 blocks cached, but logits need a token to run
    assert admit_and_compute(manager, exact) == 48
    one_more = make_seq(SYSTEM_PROMPT + [42])
    assert admit_and_compute(manager, one_more) == 64


def test_hash_chain_covers_everything_before_a_block():
    manager = BlockManager(num_blocks=32, block_size=BLOCK)
    admit_and_compute(manager, make_seq(SYSTEM_PROMPT + [1]))
    # Same tokens in blocks 1..3 but a different first block: nothing may be shared.
    changed_head = make_seq([0] * BLOCK + SYSTEM_PROMPT[BLOCK:] + [1])
    assert admit_and_compute(manager, changed_head) == 0
    # Differs inside block 2: only blocks 0 and 1 are shared.
    changed_middle = SYSTEM_PROMPT[:] + [1]
    changed_middle[40] = 5
    assert admit_and_compute(manager, make_seq(changed_middle)) == 32
    # A different salt (another adapter, other images) shares nothing.
    assert admit_and_compute(manager, make_seq(SYSTEM_PROMPT + [1], salt="adapter-2")) == 0


def test_duplicate_blocks_computed_concurrently_are_freed_cleanly():
    manager = BlockManager(num_blocks=32, block_size=BLOCK)
    first, second = make_seq(SYSTEM_PROMPT + [1]), make_seq(SYSTEM_PROMPT + [2])
    for seq in (first, second):  # both admitted before either computed anything
        assert manager.match_prefix(seq) == 0
        assert manager.allocate_for(seq, seq.num_tokens)
    for seq in (first, second):
        seq.num_computed_tokens = seq.num_tokens
        manager.commit_full_blocks(seq)
    assert not set(first.block_table) & set(second.block_table)
    assert [manager.cached_hash(b) is not None for b in first.block_table] == [True] * 4 + [False]
    assert all(manager.cached_hash(b) is None for b in second.block_table)
    assert first.block_hashes == second.block_hashes
    registered = first.block_table[:4]
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == manager.num_total_blocks
    assert manager.num_cached_free_blocks == 4
    third = make_seq(SYSTEM_PROMPT + [3])
    assert admit_and_compute(manager, third) == 64
    assert third.block_table[:4] == registered


def test_lru_evicts_least_recently_released_and_tail_blocks_first():
    manager = BlockManager(num_blocks=9, block_size=4)  # 8 usable blocks
    old = make_seq(list(range(100, 112)) + [0])  # 3 full blocks + 1
    new = make_seq(list(range(200, 212)) + [0])
    admit_and_compute(manager, old)
    admit_and_compute(manager, new)
    manager.free(old)
    manager.free(new)
    assert manager.num_cached_free_blocks == 6 and manager.num_free_blocks == 8

    # Needs 4 blocks: 2 clean ones, then the 2 oldest cached: `old`'s last two blocks.
    filler = make_seq([9] * 16)
    assert manager.allocate_for(filler, 16)
    assert manager.stats.evicted_blocks == 2
    old_prompt, new_prompt = list(range(100, 112)) + [0], list(range(200, 212)) + [0]
    assert len(manager.find_cached_prefix(make_seq(old_prompt))) == 1  # head block outlived its tail
    assert len(manager.find_cached_prefix(make_seq(new_prompt))) == 3

    # A hit refreshes: `old`'s prefix is used (and completed) again after `new` was
    # released, so eviction now takes `new`'s blocks first.
    manager.free(filler)
    reused = make_seq(old_prompt)
    assert admit_and_compute(manager, reused) == 4
    manager.free(reused)
    hog = make_seq([8] * 20)
    assert manager.allocate_for(hog, 20)  # 5 blocks: 2 clean, then new's 3 cached ones
    assert manager.find_cached_prefix(make_seq(new_prompt)) == []
    assert len(manager.find_cached_prefix(make_seq(old_prompt))) == 3
    manager.free(hog)
    assert manager.num_free_blocks == 8


def test_prefix_cache_n_keeps_only_the_last_n_released_sequences():
    manager = BlockManager(num_blocks=64, block_size=4, prefix_cache_n=2)
    prompts = [list(range(100 * k, 100 * k + 8)) + [1] for k in range(1, 4)]
    for prompt in prompts:
        seq = make_seq(prompt)
        admit_and_compute(manager, seq)
        manager.free(seq)
    hits = [len(manager.find_cached_prefix(make_seq(p))) for p in prompts]
    assert hits == [0, 2, 2]
    assert manager.stats.dropped_blocks == 2
    assert manager.num_free_blocks == manager.num_total_blocks

    # A shared prefix belongs to whoever released it last, so it survives while the
    # sequences that use it keep finishing.
    shared = list(range(500, 508))
    for k in range(4):
        seq = make_seq(shared + [k, k, k, k, 7])
        admit_and_compute(manager, seq)
        manager.free(seq)
    assert len(manager.find_cached_prefix(make_seq(shared + [9]))) == 2
    assert len(manager.find_cached_prefix(make_seq(shared + [1, 1, 1, 1, 7]))) == 2
    assert len(manager.find_cached_prefix(make_seq(shared + [2, 2, 2, 2, 7]))) == 3
    assert len(manager.find_cached_prefix(make_seq(shared + [3, 3, 3, 3, 7]))) == 3


@pytest.mark.parametrize("manager", [
    BlockManager(num_blocks=16, block_size=4, prefix_cache_n=0),
    BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False),
])
def test_disabled_prefix_cache_never_shares(manager):
    for _ in range(2):
        seq = make_seq(list(range(12)) + [1])
        assert admit_and_compute(manager, seq) == 0
        manager.free(seq)
    assert manager.num_cached_free_blocks == 0
    assert manager.stats.prefix_cache_hits == 0 and manager.stats.prefix_cache_queries == 0


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_block_accounting_exact(seed):
    rng = random.Random(seed)
    manager = BlockManager(num_blocks=40, block_size=4, prefix_cache_n=rng.choice([None, 3]))
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(400):
        action = rng.random()
        if action < 0.35 or not live:
            seq = make_seq(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))])
            cached = manager.find_cached_prefix(seq)
            if manager.can_allocate(seq, 1, cached):
                manager.match_prefix(seq, cached)
                assert manager.allocate_for(seq, 1)
                live.append(seq)
        elif action < 0.8:
            seq = rng.choice(live)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(50))
            wanted = rng.randrange(1, seq.num_tokens - seq.num_computed_tokens + 1)
            if manager.allocate_for(seq, wanted):
                seq.num_computed_tokens += wanted
                manager.commit_full_blocks(seq)
        else:
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
        assert_refcounts_match(manager, live)
        # Shared blocks are cached prefix blocks holding the same tokens at the same place.
        owners: dict[int, tuple[Sequence, int]] = {}
        for seq in live:
            for index, block in enumerate(seq.block_table):
                if block in owners:
                    other, other_index = owners[block]
                    assert manager.cached_hash(block) is not None and index == other_index
                    span = slice(index * 4, index * 4 + 4)
                    assert seq.token_ids[span] == other.token_ids[span]
                owners[block] = (seq, index)
    for seq in live:
        manager.free(seq)
    assert manager.num_free_blocks == manager.num_total_blocks
    assert all(manager.ref_count(b) == 0 for b in range(manager.num_blocks))


# --------------------------------------------------------------------------- --no-paged-attn


def test_contiguous_slots_are_fixed_block_ranges_handed_out_whole():
    num_blocks, slot_blocks = contiguous_pool_layout(num_slots=3, slot_tokens=10, block_size=4)
    assert (num_blocks, slot_blocks) == (10, 3)  # 3 slots of ceil(10 / 4) blocks, plus the null block
    manager = ContiguousBlockManager(num_slots=3, slot_blocks=3, block_size=4)
    assert manager.num_blocks == num_blocks and manager.num_total_blocks == 9 and manager.slot_tokens == 12
    assert manager.max_blocks_per_seq == 3
    seqs = [make_seq(range(5)) for _ in range(4)]
    for seq in seqs[:3]:
        assert manager.can_allocate(seq, 5) and manager.allocate_for(seq, 5)
    tables = [seq.block_table for seq in seqs[:3]]
    # Each sequence owns a whole contiguous range; together they tile blocks 1..9 once.
    assert all(table == list(range(table[0], table[0] + 3)) for table in tables)
    assert sorted(block for table in tables for block in table) == list(range(1, 10))
    assert manager.num_free_blocks == 0 and manager.num_used_blocks == 9
    assert not manager.can_allocate(seqs[3], 1) and not manager.allocate_for(seqs[3], 1)
    assert seqs[3].block_table == [] and manager.num_tokens_fitting(seqs[3]) == 0
    assert_refcounts_match(manager, seqs[:3])

    # Growing inside the slot never allocates; running past its end is refused.
    seq = seqs[0]
    seq.num_computed_tokens = 5
    assert manager.allocate_for(seq, 7) and seq.block_table == tables[0]
    assert manager.num_tokens_fitting(seq) == 7
    assert not manager.can_allocate(seq, 8) and not manager.allocate_for(seq, 8)

    # A freed slot goes to the next sequence whole; nothing is cached or shared.
    manager.free(seqs[1])
    assert seqs[1].block_table == [] and manager.num_free_blocks == 3
    assert manager.find_cached_prefix(seqs[3]) == [] and manager.match_prefix(seqs[3]) == 0
    assert manager.allocate_for(seqs[3], 5) and seqs[3].block_table == tables[1]
    manager.free(seqs[1])  # a sequence without a slot: nothing happens
    for seq in (seqs[0], seqs[2], seqs[3]):
        manager.free(seq)
    assert manager.num_free_blocks == manager.num_total_blocks
    assert all(manager.ref_count(b) == 0 for b in range(manager.num_blocks))
    assert manager.stats.prefix_cache_queries == 0 and manager.stats.prefix_cache_hits == 0


def test_reset_prefix_cache_forgets_every_prefix_and_frees_cached_blocks():
    manager = BlockManager(num_blocks=20, block_size=BLOCK)
    released = make_seq(SYSTEM_PROMPT + [1, 2])
    admit_and_compute(manager, released)
    manager.free(released)
    live = make_seq(SYSTEM_PROMPT + [3])
    assert admit_and_compute(manager, live) == 64  # shares the released sequence's blocks
    extra = make_seq(list(range(2000, 2033)))
    admit_and_compute(manager, extra)
    manager.free(extra)
    assert manager.num_cached_free_blocks == 2

    assert manager.reset_prefix_cache() == 6  # 4 system-prompt blocks in use + 2 cached free ones
    assert manager.num_cached_free_blocks == 0
    assert all(manager.cached_hash(block) is None for block in range(manager.num_blocks))
    assert_refcounts_match(manager, [live])
    again = make_seq(SYSTEM_PROMPT + [4])
    assert manager.find_cached_prefix(again) == [] and admit_and_compute(manager, again) == 0
    assert not set(again.block_table) & set(live.block_table)
    for seq in (live, again):
        manager.free(seq)
    assert manager.num_free_blocks == manager.num_total_blocks
    # Caching goes on as before after a reset.
    assert admit_and_compute(manager, make_seq(SYSTEM_PROMPT + [5])) == 64


def test_both_kv_caches_implement_the_one_protocol():
    from mistralrs_jax.engine.contiguous_cache import ContiguousBlockManager
    from mistralrs_jax.engine.kv_cache import KVCacheManager

    paged, slots = BlockManager(num_blocks=9, block_size=4), ContiguousBlockManager(2, 4, 4)
    for manager in (paged, slots):
        assert isinstance(manager, KVCacheManager)
        seq = make_seq(list(range(1, 7)))
        assert manager.allocate_for(seq, 6 + 5)  # 6 tokens and 5 draft slots
        seq.num_computed_tokens = 6
        seq.append_token(7)
        manager.trim(seq)  # drafts rejected: the paged pool takes back the block only they used
        assert len(seq.block_table) == (2 if manager is paged else 4)
        manager.free(seq)
        assert manager.num_free_blocks == manager.num_total_blocks
