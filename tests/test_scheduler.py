"""Scheduler: continuous batching, chunked prefill, preemption, aborts.

The model is simulated by a fake paged KV cache: every scheduled token is written into
its slot through the sequence's block table, and a sequence's next token is a fixed
function of the context *read back from the cache*. So a wrongly shared, evicted or
overwritten block changes the output, and every run is checked against a plain
token-by-token generation loop that knows nothing about blocks or scheduling.
"""
import random

import numpy as np
import pytest

from mistralrs_jax.engine.block_manager import NULL_BLOCK, BlockManager
from mistralrs_jax.engine.contiguous_cache import ContiguousBlockManager
from mistralrs_jax.engine.scheduler import Scheduler, SchedulerOutput
from mistralrs_jax.engine.sequence import Sequence, SequenceStatus
from mistralrs_jax.errors import InvalidRequestError, PromptTooLongError
from mistralrs_jax.sampling_params import SamplingParams

VOCAB = 50
EOS = 0


def next_token(context: list[int]) -> int:
    mixed = len(context)
    for position, token in enumerate(context[-8:]):
        mixed = (mixed * 1_000_003 + (position + 1) * (token + 7)) % 2_147_483_647
    return mixed % VOCAB


def reference_generation(prompt: list[int], max_tokens: int, max_model_len: int, ignore_eos: bool):
    context, output = list(prompt), []
    while True:
        token = next_token(context)
        context.append(token)
        output.append(token)
        if token == EOS and not ignore_eos:
            return output, "stop"
        if len(context) >= max_model_len or len(output) >= max_tokens:
            return output, "length"


class FakeModel:
    """Writes (token, position) into a paged cache and samples from what it reads back."""

    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.tokens = np.full((manager.num_blocks, manager.block_size), -1, dtype=np.int64)
        self.positions = np.full_like(self.tokens, -1)

    def slot(self, seq: Sequence, position: int) -> tuple[int, int]:
        block = seq.block_table[position // self.manager.block_size]
        assert block != NULL_BLOCK
        return block, position % self.manager.block_size

    def step(self, output: SchedulerOutput) -> dict[int, list[int]]:
        sampled = {}
        for seq, num_new in output.scheduled:
            start = seq.num_computed_tokens
            assert 0 < num_new <= seq.num_tokens - start
            for position in range(start, start + num_new):
                block, offset = self.slot(seq, position)
                # Writes only ever land in a block this sequence holds alone and that
                # the prefix cache does not serve to anyone.
                assert self.manager.ref_count(block) == 1
                assert self.manager.cached_hash(block) is None
                self.tokens[block, offset] = seq.token_ids[position]
                self.positions[block, offset] = position
            if start + num_new == seq.num_tokens:
                context = []
                for position in range(seq.num_tokens):
                    block, offset = self.slot(seq, position)
                    assert self.positions[block, offset] == position
                    context.append(int(self.tokens[block, offset]))
                sampled[seq.seq_id] = [next_token(context)]
        return sampled


def check_invariants(scheduler: Scheduler, output: SchedulerOutput) -> None:
    manager = scheduler.block_manager
    assert output.num_batched_tokens == sum(n for _, n in output.scheduled)
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len({seq.seq_id for seq, _ in output.scheduled}) == len(output.scheduled)
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert all(seq.status is SequenceStatus.RUNNING for seq, _ in output.scheduled)
    holders = [0] * manager.num_blocks
    owners: dict[int, tuple[Sequence, int]] = {}
    for seq in scheduler.waiting:
        assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table)
        for index, block in enumerate(seq.block_table):
            holders[block] += 1
            if block in owners:  # sharing is only for cached prefix blocks, same tokens, same place
                other, other_index = owners[block]
                assert manager.cached_hash(block) is not None and index == other_index
                span = slice(index * manager.block_size, (index + 1) * manager.block_size)
                assert seq.token_ids[span] == other.token_ids[span]
            owners[block] = (seq, index)
    assert holders[NULL_BLOCK] == 0
    for block in range(1, manager.num_blocks):
        assert manager.ref_count(block) == holders[block]
    assert manager.num_free_blocks == holders.count(0) - 1


class Driver:
    """The engine loop in miniature: schedule, run the fake model, update. The scheduler
    applies EOS (when it knows the id) and max_tokens itself; otherwise EOS is finished here."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.model = FakeModel(scheduler.block_manager)
        self.finished: list[Sequence] = []
        self.outputs: list[SchedulerOutput] = []
        self.steps = 0

    def step(self) -> SchedulerOutput:
        waiting_before = set(self.scheduler.waiting)
        output = self.scheduler.schedule()
        check_invariants(self.scheduler, output)
        if output.preempted:  # a step short of blocks admits nobody new
            assert not any(seq in waiting_before for seq, _ in output.scheduled)
        self.finished.extend(output.finished_over_capacity)
        for seq, tokens in self.scheduler.update_after_step(output, self.model.step(output)):
            assert tokens == [seq.last_token_id]
            if seq.last_token_id == EOS and not seq.params.ignore_eos and seq.finish_reason != "stop":
                self.scheduler.finish(seq, "stop", EOS)
            if seq.is_finished:
                self.finished.append(seq)
        self.outputs.append(output)
        self.steps += 1
        return output

    def run(self, max_steps: int = 2000) -> None:
        while self.scheduler.has_unfinished():
            self.step()
            assert self.steps < max_steps, "the scheduler stopped making progress"


def make_seqs(request_id, prompt, max_tokens, n=1, arrival=None, ignore_eos=False):
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    return [Sequence(request_id, prompt, params, index=i, arrival_time=arrival) for i in range(n)]


def assert_matches_reference(seq: Sequence, max_model_len: int, truncated_ok: bool = False) -> None:
    expected, reason = reference_generation(
        seq.prompt_token_ids, seq.params.max_tokens, max_model_len, seq.params.ignore_eos
    )
    if truncated_ok:
        assert seq.output_token_ids == expected[: seq.num_output_tokens]
    else:
        assert (seq.output_token_ids, seq.finish_reason) == (expected, reason)


CONFIGS = [
    # num_blocks, block_size, max_num_seqs, budget, prefix caching, prefix_cache_n, chunked, threshold
    dict(num_blocks=24, block_size=4, max_num_seqs=6, budget=24, caching=True, cache_n=None, chunked=True, threshold=0),
    dict(num_blocks=18, block_size=4, max_num_seqs=8, budget=16, caching=True, cache_n=2, chunked=True, threshold=8),
    dict(num_blocks=14, block_size=8, max_num_seqs=3, budget=80, caching=False, cache_n=None, chunked=False, threshold=0),
    dict(num_blocks=12, block_size=8, max_num_seqs=16, budget=7, caching=True, cache_n=None, chunked=True, threshold=0),
]


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_produces_the_reference_outputs(seed):
    rng = random.Random(seed)
    config = CONFIGS[seed % len(CONFIGS)]
    max_model_len = 80
    manager = BlockManager(config["num_blocks"], config["block_size"], config["caching"], config["cache_n"])
    scheduler = Scheduler(
        manager, config["max_num_seqs"], config["budget"], max_model_len,
        enable_chunked_prefill=config["chunked"], long_prefill_token_threshold=config["threshold"],
        eos_token_ids=[EOS] if seed % 2 else (),  # check_stop's EOS, or the driver's
    )
    driver = Driver(scheduler)
    system_prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 30))] for _ in range(3)]
    arrivals: dict[int, list] = {}
    for request in range(30):
        prompt = rng.choice(system_prompts) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
        seqs = make_seqs(f"r{request}", prompt, rng.randrange(1, 30), n=rng.choice([1, 1, 1, 2]),
                         arrival=float(request), ignore_eos=rng.random() < 0.5)
        arrivals.setdefault(rng.randrange(40), []).append(seqs)
    aborted_requests = set()
    abort_steps = set(rng.sample(range(60), 4))
    while arrivals or scheduler.has_unfinished():
        for seqs in arrivals.pop(driver.steps, []):
            for seq in seqs:
                scheduler.add(seq)
        if driver.steps in abort_steps and scheduler.has_unfinished():
            victim = rng.choice(list(scheduler.waiting) + scheduler.running)
            aborted = scheduler.abort(victim.request_id)
            assert victim in aborted and all(s.finish_reason == "abort" for s in aborted)
            aborted_requests.add(victim.request_id)
            driver.finished.extend(aborted)
        driver.step()
        assert driver.steps < 3000

    assert manager.num_free_blocks == manager.num_total_blocks
    assert all(manager.ref_count(block) == 0 for block in range(manager.num_blocks))
    assert len(driver.finished) == len({seq.seq_id for seq in driver.finished})
    # Sequences too long for the whole pool end early with "length"; their output so
    # far must still be right.
    over_capacity = {seq for output in driver.outputs for seq in output.finished_over_capacity}
    assert all(seq.finish_reason == "length" for seq in over_capacity)
    for seq in driver.finished:
        assert seq.is_finished and seq.block_table == []
        cut_short = seq.request_id in aborted_requests or seq in over_capacity
        assert_matches_reference(seq, max_model_len, truncated_ok=cut_short)
    completed = [s for s in driver.finished if s.request_id not in aborted_requests and s not in over_capacity]
    assert len(completed) > 20
    if config["num_blocks"] <= 20:
        assert scheduler.num_preempted_total > 0  # the small pools do exercise recompute
    if config["caching"]:
        assert manager.stats.prefix_cache_hits > 0


def test_preempted_sequence_resumes_and_finishes_with_the_same_output():
    manager = BlockManager(num_blocks=9, block_size=4)  # 32 token slots
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    older = make_seqs("older", [1, 2, 3, 4, 5, 6, 7, 8], 20, arrival=0.0, ignore_eos=True)[0]
    newer = make_seqs("newer", [9, 8, 7, 6, 5, 4, 3, 2], 20, arrival=1.0, ignore_eos=True)[0]
    scheduler.add(older)
    scheduler.add(newer)
    driver = Driver(scheduler)
    preempted = []
    while scheduler.has_unfinished():
        preempted += driver.step().preempted
        assert driver.steps < 200
    assert preempted and set(preempted) == {newer}  # the most recent arrival gives way
    assert newer.num_preemptions == scheduler.num_preempted_total == len(preempted)
    for seq in (older, newer):
        assert seq.num_output_tokens == 20
        assert_matches_reference(seq, 64)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_preempted_sequence_goes_to_the_front_of_the_queue():
    manager = BlockManager(num_blocks=7, block_size=4)  # 24 slots
    scheduler = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    first, second, third = (make_seqs(f"r{i}", [i + 1] * 6, 10, arrival=float(i), ignore_eos=True)[0]
                            for i in range(3))
    for seq in (first, second, third):
        scheduler.add(seq)
    driver = Driver(scheduler)
    while not driver.step().preempted:
        assert driver.steps < 50
    assert list(scheduler.waiting) == [second, third]
    assert second.status is SequenceStatus.PREEMPTED
    driver.run()
    for seq in (first, second, third):
        assert_matches_reference(seq, 64)


def test_chunked_prefill_respects_the_token_budget_next_to_decodes():
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128)
    decoder = make_seqs("decoder", [3, 1, 4], 12, arrival=0.0, ignore_eos=True)[0]
    scheduler.add(decoder)
    driver = Driver(scheduler)
    driver.step()  # the short prompt
    long_prompt = make_seqs("long", list(range(1, 41)) + list(range(1, 11)), 4, arrival=1.0, ignore_eos=True)[0]
    scheduler.add(long_prompt)
    chunks = []
    while long_prompt.num_output_tokens == 0:
        output = driver.step()
        scheduled = dict(output.scheduled)
        assert scheduled[decoder] == 1 and output.scheduled[0][0] is decoder  # running (older) first
        assert output.num_batched_tokens <= 16
        chunks.append(scheduled[long_prompt])
    assert chunks == [15, 15, 15, 5]
    driver.run()
    assert_matches_reference(decoder, 128)
    assert_matches_reference(long_prompt, 128)


def test_prefill_chunk_shrinks_to_the_free_blocks_instead_of_preempting():
    manager = BlockManager(num_blocks=9, block_size=4)  # 8 usable blocks
    scheduler = Scheduler(manager, 4, 16, 64, long_prefill_token_threshold=8)
    prompt = make_seqs("prompt", list(range(1, 29)), 2, arrival=0.0, ignore_eos=True)[0]
    chat = make_seqs("chat", [4] * 8, 6, arrival=1.0, ignore_eos=True)[0]
    scheduler.add(prompt)
    scheduler.add(chat)
    driver = Driver(scheduler)
    assert dict(driver.step().scheduled) == {prompt: 8, chat: 8}
    second = driver.step()
    assert second.scheduled == [(prompt, 8), (chat, 1)]  # oldest first (the runner puts decodes first)
    assert manager.num_free_blocks == 1
    third = driver.step()  # 8 more prompt tokens need 2 blocks; 1 is free
    assert dict(third.scheduled) == {prompt: 4, chat: 1} and third.preempted == []
    driver.run()
    for seq in (prompt, chat):
        assert_matches_reference(seq, 64)


def test_long_prefill_threshold_caps_one_sequence_per_step():
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(manager, 4, 64, 128, long_prefill_token_threshold=10)
    seqs = [make_seqs(f"r{i}", list(range(1, 26)), 2, arrival=float(i))[0] for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    driver = Driver(scheduler)
    output = driver.step()
    assert [n for _, n in output.scheduled] == [10, 10]
    driver.run()
    for seq in seqs:
        assert_matches_reference(seq, 128)


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits():
    with pytest.raises(ValueError, match="chunked prefill"):
        Scheduler(BlockManager(64, 4), 4, 32, 64, enable_chunked_prefill=False)
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(manager, 4, 40, 40, enable_chunked_prefill=False)
    first = make_seqs("a", list(range(1, 31)), 3, arrival=0.0)[0]
    second = make_seqs("b", list(range(2, 32)), 3, arrival=1.0)[0]
    scheduler.add(first)
    scheduler.add(second)
    driver = Driver(scheduler)
    assert [(s, n) for s, n in driver.step().scheduled] == [(first, 30)]  # 10 tokens left: b waits
    assert dict(driver.step().scheduled) == {first: 1, second: 30}
    driver.run()
    assert_matches_reference(first, 40)
    assert_matches_reference(second, 40)


def test_admission_is_first_come_first_served_up_to_max_num_seqs():
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    seqs = [make_seqs(f"r{i}", [i + 1] * 5, 3 + i, arrival=float(i), ignore_eos=True)[0] for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    driver = Driver(scheduler)
    first_step = driver.step()
    assert [seq for seq, _ in first_step.scheduled] == seqs[:2]
    assert list(scheduler.waiting) == [seqs[2]]
    while seqs[0].status is not SequenceStatus.FINISHED:
        assert seqs[2].status is SequenceStatus.WAITING
        driver.step()
    assert seqs[2].status is SequenceStatus.WAITING  # admitted on the step after a slot frees
    assert seqs[2] in dict(driver.step().scheduled)
    driver.run()
    for seq in seqs:
        assert_matches_reference(seq, 64)


def test_waiting_queue_is_not_skipped_when_its_head_does_not_fit():
    manager = BlockManager(num_blocks=9, block_size=4)  # 32 slots
    scheduler = Scheduler(manager, 8, 64, 64)
    hog = make_seqs("hog", list(range(1, 21)), 4, arrival=0.0, ignore_eos=True)[0]
    big = make_seqs("big", list(range(1, 17)), 2, arrival=1.0, ignore_eos=True)[0]
    small = make_seqs("small", [5], 2, arrival=2.0, ignore_eos=True)[0]
    for seq in (hog, big, small):
        scheduler.add(seq)
    driver = Driver(scheduler)
    assert [seq for seq, _ in driver.step().scheduled] == [hog]  # big needs 4 blocks, 2 are free
    assert list(scheduler.waiting) == [big, small]
    driver.run()
    assert big.first_scheduled_time <= small.first_scheduled_time


def test_shared_system_prompt_is_served_from_the_prefix_cache():
    manager = BlockManager(num_blocks=64, block_size=16)
    scheduler = Scheduler(manager, 4, 256, 256)
    system = [(7 * i) % (VOCAB - 1) + 1 for i in range(64)]
    first = make_seqs("first", system + [1, 2, 3], 3, arrival=0.0)[0]
    scheduler.add(first)
    driver = Driver(scheduler)
    driver.step()
    second = make_seqs("second", system + [4, 5], 3, arrival=1.0)[0]
    scheduler.add(second)
    output = driver.step()
    assert dict(output.scheduled)[second] == 2  # only the 2 new tokens run
    assert second.num_cached_prefix_tokens == 64
    assert second.block_table[:4] == first.block_table[:4]
    assert manager.stats.prefix_cache_hits == 64 and manager.stats.prefix_cache_block_hits == 4
    driver.run()
    assert_matches_reference(first, 256)
    assert_matches_reference(second, 256)


def test_abort_frees_blocks_of_waiting_running_and_preempted_sequences():
    manager = BlockManager(num_blocks=7, block_size=4)  # 24 slots
    scheduler = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    seqs = [make_seqs(f"r{i}", [i + 1] * 6, 10, arrival=float(i), ignore_eos=True)[0] for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    driver = Driver(scheduler)
    while not driver.step().preempted:
        assert driver.steps < 50
    running, preempted, waiting = seqs
    assert preempted.status is SequenceStatus.PREEMPTED and waiting.status is SequenceStatus.WAITING
    assert scheduler.abort("nobody") == []
    for seq in (preempted, waiting, running):
        held_before = manager.num_used_blocks
        assert scheduler.abort(seq.request_id) == [seq]
        assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort"
        assert seq.block_table == []
        assert manager.num_used_blocks == held_before - (4 if seq is running else 0)
    assert not scheduler.has_unfinished()
    assert manager.num_free_blocks == manager.num_total_blocks
    assert scheduler.abort(running.request_id) == []


def test_abort_between_schedule_and_update_skips_the_sequence():
    manager = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(manager, 4, 32, 64)
    pair = make_seqs("pair", [1, 2, 3, 4, 5], 5, n=2)
    for seq in pair:
        scheduler.add(seq)
    output = scheduler.schedule()
    sampled = FakeModel(manager).step(output)
    assert scheduler.abort("pair") == pair
    assert scheduler.update_after_step(output, sampled) == []
    assert all(seq.num_output_tokens == 0 for seq in pair)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_max_model_len_finishes_with_length():
    manager = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(manager, 4, 32, max_model_len=12)
    seq = make_seqs("r", [1, 2, 3, 4, 5, 6, 7], 100, ignore_eos=True)[0]
    scheduler.add(seq)
    Driver(scheduler).run()
    assert seq.finish_reason == "length" and seq.num_tokens == 12 and seq.num_output_tokens == 5
    assert_matches_reference(seq, 12)
    # A stop on the very last token is still reported as a stop.
    scheduler.finish(seq, "stop", EOS)
    assert seq.finish_reason == "stop" and manager.num_free_blocks == manager.num_total_blocks


def test_prompts_that_can_never_be_served_are_rejected():
    scheduler = Scheduler(BlockManager(num_blocks=5, block_size=4), 4, 64, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="KV cache"):
        scheduler.add(make_seqs("pool", list(range(1, 17)), 4)[0])  # 16 tokens, 16 slots
    with pytest.raises(PromptTooLongError, match="context"):
        Scheduler(BlockManager(64, 4), 4, 64, max_model_len=10).add(make_seqs("ctx", [1] * 10, 4)[0])
    with pytest.raises(InvalidRequestError, match="empty"):
        scheduler.add(make_seqs("empty", [], 4)[0])
    assert not scheduler.has_unfinished()


def test_sequence_outgrowing_the_whole_pool_finishes_instead_of_livelocking():
    manager = BlockManager(num_blocks=5, block_size=4)  # 16 slots
    scheduler = Scheduler(manager, 4, 64, max_model_len=100)
    grower = make_seqs("grower", list(range(1, 11)), 50, arrival=0.0, ignore_eos=True)[0]
    neighbour = make_seqs("neighbour", [3, 3], 30, arrival=1.0, ignore_eos=True)[0]
    scheduler.add(grower)
    scheduler.add(neighbour)
    driver = Driver(scheduler)
    driver.run(max_steps=300)
    capacity_finished = [seq for output in driver.outputs for seq in output.finished_over_capacity]
    assert grower in capacity_finished and grower.finish_reason == "length"
    assert grower.num_tokens == 17  # ran while 16 KV slots sufficed, then stopped
    assert_matches_reference(grower, 100, truncated_ok=True)
    assert neighbour.finish_reason == "length"
    assert_matches_reference(neighbour, 100, truncated_ok=neighbour in capacity_finished)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_sequence_keeps_prompt_and_output_in_one_list_and_resolves_seeds():
    from mistralrs_jax.engine.sampler import resolve_seed as sampler_seed

    params = SamplingParams(n=3, seed=2**31 + 5, max_tokens=4)
    seqs = [Sequence("r", np.array([5, 6, 7]), params, index=i) for i in range(3)]
    # seed + index; every u32 seed is used as it is (not folded onto seed - 2**31).
    assert [seq.seed for seq in seqs] == [2**31 + 5, 2**31 + 6, 2**31 + 7]
    assert [sampler_seed(params, i) for i in range(3)] == [seq.seed for seq in seqs]  # one rule
    assert len({seq.seq_id for seq in seqs}) == 3
    seq = seqs[0]
    assert seq.token_ids == [5, 6, 7] and all(type(t) is int for t in seq.token_ids)
    seq.append_token(np.int32(9))
    seq.append_token(3)
    assert seq.token_ids == [5, 6, 7, 9, 3] and seq.output_token_ids == [9, 3]
    assert seq.prompt_token_ids == [5, 6, 7] and seq.last_token_id == 3
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (5, 3, 2)
    seq.num_computed_tokens = 4
    assert seq.is_decoding and seq.num_uncomputed_tokens == 1
    unseeded = Sequence("u", [1], SamplingParams())
    assert 0 <= unseeded.seed < 2**32


@pytest.mark.parametrize("seed", range(4))
def test_contiguous_slots_serve_a_random_workload_without_preemption(seed):
    """--no-paged-attn: the same scheduler over fixed per-sequence slots gives the
    reference outputs, admits at most one sequence per slot, never preempts, and a
    sequence reaching the end of its slot (max_model_len) finishes with "length"."""
    rng = random.Random(seed)
    max_model_len = 40
    num_slots, slot_blocks = 3, 10  # 3 slots of 40 tokens
    manager = ContiguousBlockManager(num_slots, slot_blocks, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=num_slots, max_num_batched_tokens=rng.choice([8, 24]),
                          max_model_len=max_model_len)
    driver = Driver(scheduler)
    requests = []
    for request in range(12):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))]
        seqs = make_seqs(f"r{request}", prompt, rng.randrange(1, 40), n=rng.choice([1, 2]), arrival=float(request),
                         ignore_eos=rng.random() < 0.5)
        requests.append(seqs)
        for seq in seqs:
            scheduler.add(seq)
    aborted = requests[rng.randrange(12)]
    for _ in range(rng.randrange(1, 10)):
        driver.step()
    driver.finished.extend(scheduler.abort(aborted[0].request_id))  # [] if it had finished already
    driver.run()
    assert scheduler.num_preempted_total == 0
    assert all(len(output.scheduled) <= num_slots for output in driver.outputs)
    assert len(driver.finished) == sum(len(seqs) for seqs in requests)
    for seq in driver.finished:
        assert seq.block_table == []
        assert_matches_reference(seq, max_model_len, truncated_ok=seq in aborted)
    assert any(seq.num_tokens == max_model_len and seq.finish_reason == "length" for seq in driver.finished)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_lookahead_slots_for_speculation_are_the_schedulers_and_rejected_ones_go_back():
    """vLLM v1's shape: the scheduler reserves KV slots for draft tokens (capped by max_tokens,
    never for a partial prefill chunk), update_after_step appends the accepted run one token at
    a time through check_stop, and the blocks only rejected drafts used go back to the pool."""
    manager = BlockManager(num_blocks=40, block_size=2)
    scheduler = Scheduler(manager, 4, 8, 64, num_lookahead_tokens=3, eos_token_ids=[EOS])
    seq = make_seqs("spec", [1, 2, 3, 4, 5], 7, ignore_eos=True)[0]
    chunked = make_seqs("long", list(range(1, 12)), 4, arrival=seq.arrival_time + 1)[0]
    scheduler.add(seq)
    scheduler.add(chunked)
    first = scheduler.schedule()
    assert first.scheduled == [(seq, 5), (chunked, 3)]  # the 8-token budget cuts the second prompt
    assert first.lookahead == {seq.seq_id: 3}  # a partial chunk samples nothing, so drafts nothing
    assert len(seq.block_table) == 4 and len(chunked.block_table) == 2  # 5 + 3 slots; 3 slots
    appended = scheduler.update_after_step(first, {seq.seq_id: [7, 8, 9], chunked.seq_id: [42]})
    assert appended == [(seq, [7, 8, 9])]  # two drafts accepted, then the final token
    assert (seq.num_tokens, seq.num_computed_tokens) == (8, 7) and len(seq.block_table) == 4
    assert chunked.num_computed_tokens == 3 and chunked.num_output_tokens == 0

    free_before = manager.num_free_blocks
    second = scheduler.schedule()
    assert second.lookahead[seq.seq_id] == 3
    assert len(seq.block_table) == 6  # 7 computed + 1 + 3 slots
    scheduler.update_after_step(second, {seq.seq_id: [10], chunked.seq_id: [0]})  # both drafts rejected
    assert (seq.num_tokens, seq.num_computed_tokens) == (9, 8) and len(seq.block_table) == 5  # one block back
    assert manager.num_free_blocks == free_before - 1 - (len(chunked.block_table) - 2)

    third = scheduler.schedule()
    assert third.lookahead == {seq.seq_id: 2, chunked.seq_id: 3}  # max_tokens 7: 4 out, so 2 drafts + 1
    tokens = {seq.seq_id: [11, 12, 13], chunked.seq_id: [EOS, 13, 14]}
    appended = dict(scheduler.update_after_step(third, tokens))
    assert appended[seq] == [11, 12, 13] and seq.finish_reason == "length" and seq.num_output_tokens == 7
    # EOS accepted inside a run ends it there (check_stop), the tokens after it are dropped.
    assert appended[chunked] == [EOS] and chunked.finish_reason == "stop" and chunked.stop_reason == EOS
    assert seq.block_table == chunked.block_table == [] and manager.num_free_blocks == manager.num_total_blocks


def test_prefix_cache_takes_blocks_only_up_to_what_every_model_cached():
    manager = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(manager, 4, 32, 64, num_lookahead_tokens=2)
    seq = make_seqs("r", list(range(1, 9)), 8, ignore_eos=True)[0]
    scheduler.add(seq)
    output = scheduler.schedule()
    # The target computed 8 tokens (two full blocks) but the draft model only 7: one block.
    scheduler.update_after_step(output, {seq.seq_id: [20]}, cacheable={seq.seq_id: 7})
    assert len(seq.block_hashes) == 1
    output = scheduler.schedule()
    scheduler.update_after_step(output, {seq.seq_id: [21]}, cacheable={seq.seq_id: 9})
    assert len(seq.block_hashes) == 2
