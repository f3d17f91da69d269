"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

A small draft model proposes up to ``gamma`` tokens per sequence; the target model checks
them all in one step, and standard speculative sampling keeps the output distributed
exactly as the target alone would produce it. One engine step:

1. The scheduler decides ``{sequence: tokens}`` as usual (prefill chunks and decodes).
2. Every row whose chunk completes its known tokens *speculates*: it gets k <= gamma
   lookahead tokens (fewer near ``max_tokens`` or ``max_model_len``, or when the KV pool
   is short) and the blocks they need. A partial prefill chunk gets none.
3. Draft pass 1 runs, on the draft's own KV cache, each row's tokens the draft has not
   seen (the target's prefill chunk, or the pending token, plus the one it missed last
   step) and samples draft token 1; passes 2..k feed each draft token back and sample
   the next. The draft distributions q stay on the device; only the ids come back.
4. One target step runs each row's chunk followed by its draft tokens and keeps the logits
   of the last chunk token and of every draft token (a prefill chunk of k + 1 tokens whose
   logits are needed at every position).
5. On the device (`verify`): draft token x is accepted with probability min(1, p(x)/q(x));
   at the first rejection the token is drawn from norm(max(0, p - q)); if all k are
   accepted, a bonus token is drawn from p. Each request's sampling settings (logit bias,
   penalties over the history *including* earlier draft tokens, temperature, top-k, top-p,
   min-p) shape both p and q exactly as `sampler.sample` shapes its distribution, so every
   SamplingParams field keeps its meaning under speculation. Greedy rows reduce to the
   longest prefix of draft tokens equal to the target's argmax, then the argmax.
6. On the host: accepted tokens and the final one are appended one at a time through the
   engine's own postprocessing, so EOS, stop strings and max_tokens end a run midway;
   ``num_computed_tokens`` drops back past rejected positions (their KV is overwritten
   later) and blocks only the rejected tail used go back to the pool.

KV: both models share the block manager, so a sequence has one block table that indexes
two caches (the target's and the draft's, each ``num_blocks`` blocks). The draft lags the
target by at most one token (the last draft token of a fully accepted run was never fed
to the draft); the next pass 1 catches up. Prefix-cache blocks are registered only once
the draft's KV in them is complete too, so a shared prefix serves both models.

Random numbers: each decision draws from ``fold_in(fold_in(key(seed), output index),
purpose)``, row-local as in the sampler, so seeded requests repeat. Different purposes
(draft draw, acceptance test, final draw) never share a uniform, and the uniforms a step
uses belong to output indices no earlier kept decision used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..config import ModelConfig
from ..errors import ModelLoadError, NotSupportedError
from ..loading.tokenizer import Tokenizer
from .block_manager import BlockManager
from .engine import Engine
from .runner import SAMPLER_WARMUP_PARAMS, ModelRunner, StepResult, compiled_sampler_variant
# The sampler's own building blocks, so speculative distributions are filtered exactly as
# the plain path filters them.
from .sampler import (_THREEFRY, GREEDY_TEMPERATURE, PENALTY_WINDOW, SamplerModes, SamplingArrays,
                      _blocked_argmax, _inverse_cdf, _rows_per_chunk, _top_k, _truncation_mask,
                      apply_logit_adjustments, build_sampling_arrays)
from .scheduler import LENGTH, Scheduler
from .sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

# Draft tokens per step. mistral.rs' TOML default is 32. A step yields (1 - a^(g+1)) / (1 - a)
# tokens on average for acceptance a (Leviathan et al.): at a = 0.8 that is 3.4 tokens for
# g = 4 and at most 5 for any g, while every draft token costs a draft pass, a target logits
# row and max_seqs x vocab floats of device memory for q. So a handful, not 32.
DEFAULT_GAMMA = 4

# fold_in salts: which decision a uniform is for.
_SALT_DRAFT, _SALT_ACCEPT, _SALT_FINAL = 1, 2, 3


# ----------------------------------------------------------------------------- device side


def _uniforms(seeds: jax.Array, steps: jax.Array, salt: int) -> jax.Array:
    """One U[0, 1) per element of `steps` (seeds alike shaped)."""
    def one(seed, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed, impl=_THREEFRY), step), salt)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(seeds.reshape(-1), steps.reshape(-1)).reshape(steps.shape)


def _distribution_rows(logits, arrays: SamplingArrays, modes: SamplerModes):
    """(probs f32[R, V], greedy ids i32[R]): the distribution `sampler.sample` draws each row
    from (bias, penalties, temperature, top-k/top-p/min-p, renormalized); one-hot at the
    argmax of the adjusted logits for greedy rows."""
    adjusted = apply_logit_adjustments(logits.astype(jnp.float32), arrays, modes)
    greedy_ids = _blocked_argmax(adjusted)
    greedy_row = arrays.temperature < GREEDY_TEMPERATURE
    temperature = jnp.where(greedy_row, 1.0, arrays.temperature)
    scaled = adjusted / temperature[:, None]
    row_max = jnp.max(scaled, axis=-1, keepdims=True)
    relative_probs = jnp.exp(scaled - row_max)
    one_hot = jnp.arange(scaled.shape[1])[None, :] == greedy_ids[:, None]
    if modes.use_filters:
        top_k = jnp.where(greedy_row, 0, arrays.top_k)
        top_p = jnp.where(greedy_row, 1.0, arrays.top_p)
        keep = _truncation_mask(scaled, row_max, relative_probs, top_k, top_p, arrays.min_p) | one_hot
        relative_probs = jnp.where(keep, relative_probs, 0.0)
    probs = relative_probs / jnp.sum(relative_probs, axis=-1, keepdims=True)
    return jnp.where(greedy_row[:, None], one_hot.astype(jnp.float32), probs), greedy_ids


def _by_row_chunks(fn: Callable, logits, arrays):
    """`fn(logits, arrays)` a slab of rows at a time on CPU (as `sampler.sample` does: the
    [rows, V] temporaries then stay small enough for malloc to reuse)."""
    num_rows, vocab = logits.shape
    rows_per_chunk = _rows_per_chunk(num_rows, vocab) if jax.default_backend() == "cpu" else num_rows
    if rows_per_chunk == num_rows:
        return fn(logits, arrays)
    num_chunks = num_rows // rows_per_chunk
    chunked = jax.tree.map(lambda x: x.reshape(num_chunks, rows_per_chunk, *x.shape[1:]), (logits, arrays))
    out = lax.map(lambda chunk: fn(*chunk), chunked)
    return jax.tree.map(lambda x: x.reshape(num_rows, *x.shape[2:]), out)


def draft_sample(logits, arrays: SamplingArrays, q_buffer, q_rows, position, modes: SamplerModes):
    """Draw one draft token per row of `logits` (f32[S, V]) and store the distribution it
    was drawn from in ``q_buffer[q_rows[i], position]`` (f32[Q, gamma, V]; rows with an
    out-of-range ``q_rows`` entry are not stored). Returns (ids i32[S], q_buffer).
    Jit with ``static_argnames=("modes",)`` and the buffer donated."""
    if modes.all_greedy:
        # Greedy verification never reads q (see `verify`).
        return _blocked_argmax(apply_logit_adjustments(logits.astype(jnp.float32), arrays, modes)), q_buffer
    probs, greedy_ids = _by_row_chunks(lambda x, a: _distribution_rows(x, a, modes), logits, arrays)
    sampled = _inverse_cdf(probs, _uniforms(arrays.seeds, arrays.steps, _SALT_DRAFT))
    ids = jnp.where(arrays.temperature < GREEDY_TEMPERATURE, greedy_ids, sampled).astype(jnp.int32)
    return ids, q_buffer.at[q_rows, position].set(probs, mode="drop")


class VerifyResult(NamedTuple):
    num_accepted: jax.Array  # i32[S]: leading draft tokens accepted
    token_ids: jax.Array  # i32[S, gamma + 1]: the accepted drafts, then the final token at num_accepted
    logprobs: jax.Array  # f32[S, gamma + 1]: log_softmax(raw target logits) at token_ids
    top_ids: jax.Array  # i32[S, gamma + 1, K], by descending logprob
    top_logprobs: jax.Array  # f32[S, gamma + 1, K]


def verify(logits, arrays: SamplingArrays, q_buffer, q_rows, logit_rows, draft_ids, num_draft,
           modes: SamplerModes) -> VerifyResult:
    """Speculative sampling for S rows at once. Jit with ``static_argnames=("modes",)``.

    logits: f32[L, V], the target's raw logits at L token positions; `arrays` has one row
    per position (that position's sampling settings, penalty history and output index).
    logit_rows: i32[S, gamma + 1], row s's position j -> its logits row (j = 0 follows the
    last chunk token, j > 0 follows draft token j). draft_ids: i32[S, gamma]; num_draft:
    i32[S], how many of them are real (0: plain sampling from p). q_rows: i32[S], row s's
    draft distributions in q_buffer (f32[Q, gamma, V]).

    Greedy rows never read q: with p one-hot, u * q(x) < p(x) holds iff x is the argmax
    (0 <= u * q < 1), and their final token is the argmax itself.
    """
    num_rows, gamma = draft_ids.shape
    positions = jnp.arange(gamma)[None, :]
    is_draft = positions < num_draft[:, None]
    rows = jnp.arange(num_rows)
    if modes.all_greedy:
        adjusted = apply_logit_adjustments(logits.astype(jnp.float32), arrays, modes)
        target_ids = _blocked_argmax(adjusted)[logit_rows]  # [S, gamma + 1]
        accepted = (draft_ids == target_ids[:, :gamma]) & is_draft
        num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
        final = target_ids[rows, num_accepted]
    else:
        probs, greedy_ids = _by_row_chunks(lambda x, a: _distribution_rows(x, a, modes), logits, arrays)
        p_draft = probs[logit_rows[:, :gamma], draft_ids]  # p_j(x_j)
        q_draft = q_buffer[q_rows[:, None], positions, draft_ids]  # q_j(x_j)
        seeds, steps = arrays.seeds[logit_rows], arrays.steps[logit_rows]
        uniforms = _uniforms(seeds[:, :gamma], steps[:, :gamma], _SALT_ACCEPT)
        # u < p/q without a division (q > 0 for every drawn token; p = 0 always rejects).
        accepted = (uniforms * q_draft < p_draft) & is_draft
        num_accepted = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
        final_rows = logit_rows[rows, num_accepted]
        p_final = probs[final_rows]
        q_final = q_buffer[q_rows, jnp.minimum(num_accepted, gamma - 1)]
        residual = jnp.maximum(p_final - q_final, 0.0)
        # After a rejection: norm(max(0, p - q)). That is all zero only when p == q up to
        # rounding, where a rejection had probability ~0: then p itself.
        use_residual = (num_accepted < num_draft) & (jnp.sum(residual, axis=-1) > 0.0)
        weights = jnp.where(use_residual[:, None], residual, p_final)
        final_uniforms = _uniforms(seeds[rows, num_accepted], steps[rows, num_accepted], _SALT_FINAL)
        sampled = _inverse_cdf(weights, final_uniforms)
        greedy_row = arrays.temperature[final_rows] < GREEDY_TEMPERATURE
        final = jnp.where(greedy_row, greedy_ids[final_rows], sampled)
    padded_drafts = jnp.concatenate([draft_ids, jnp.zeros((num_rows, 1), draft_ids.dtype)], axis=1)
    all_positions = jnp.arange(gamma + 1)[None, :]
    token_ids = jnp.where(all_positions < num_accepted[:, None], padded_drafts, final[:, None]).astype(jnp.int32)

    raw = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(raw, axis=-1)
    logprobs = raw[logit_rows, token_ids] - log_normalizer[logit_rows]
    if modes.num_logprobs > 0:
        top_raw, top_ids = _top_k(raw, modes.num_logprobs, block=64)
        top_logprobs = (top_raw - log_normalizer[:, None])[logit_rows]
        top_ids = top_ids.astype(jnp.int32)[logit_rows]
    else:
        top_ids = jnp.zeros((num_rows, gamma + 1, 0), jnp.int32)
        top_logprobs = jnp.zeros((num_rows, gamma + 1, 0), jnp.float32)
    return VerifyResult(num_accepted, token_ids, logprobs, top_ids, top_logprobs)


# ------------------------------------------------------------------------------- host side


@dataclass
class _Row:
    """One scheduled sequence in a speculative step."""

    seq: Sequence
    start: int  # num_computed_tokens when the step began
    num_new: int  # tokens the scheduler gave it (a prefill chunk, or the pending token)
    draft_start: int  # first position whose draft KV is missing
    lookahead: int = 0  # draft tokens it proposes this step (k)
    q_row: int = 0  # its rows of the q buffer
    drafts: list[int] = field(default_factory=list)
    # Filled by verification: tokens to append (accepted drafts + final) and where their
    # logprobs are in the host copy of the VerifyResult.
    tokens: list[int] = field(default_factory=list)
    result_row: int = 0

    @property
    def chunk_end(self) -> int:
        return self.start + self.num_new

    @property
    def completes(self) -> bool:
        """The chunk reaches the last known token, so the step samples a new one."""
        return self.chunk_end == self.seq.num_tokens


def _history(seq: Sequence, extra: list[int]) -> tuple[list[int], int]:
    """(tokens, number of prompt tokens among them) for `build_sampling_arrays`: the tail of
    ``seq``'s tokens the penalty window can see, followed by `extra` draft tokens."""
    if not seq.params.uses_penalties:
        return [], 0
    tail = seq.token_ids[-PENALTY_WINDOW:]
    return tail + extra, seq.num_prompt_tokens - (seq.num_tokens - len(tail))


class SpeculativeEngine(Engine):
    """The engine loop with speculative steps: the target `runner` verifies what the
    `draft_runner` proposes. Both runners share the scheduler's block manager."""

    def __init__(self, runner: ModelRunner, draft_runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer,
                 eos_token_ids: set[int], vocab_size: int, gamma: int = DEFAULT_GAMMA):
        if gamma < 1:
            raise NotSupportedError(f"speculative decoding needs gamma >= 1 draft tokens per step, got {gamma}")
        if draft_runner.block_size != runner.block_size or draft_runner.num_blocks != runner.num_blocks:
            raise ValueError("the draft runner must have the target runner's block layout")
        self.draft_runner = draft_runner
        self.gamma = gamma
        self.num_draft_tokens = 0  # proposed draft tokens the target checked
        self.num_accepted_tokens = 0
        self.num_speculative_steps = 0  # row-steps that proposed at least one token
        self._draft_computed: dict[int, int] = {}  # seq_id -> positions whose draft KV is written
        self._logprob_arrays: tuple | None = None  # host logprobs of the step being committed
        # q of every speculating row: the draft distributions verification needs. Row count is
        # max_seqs, the most rows a step can have (runner.seq_buckets ends there).
        self._q_rows = runner.seq_buckets[-1]
        self._q_buffer = jnp.zeros((self._q_rows, gamma, vocab_size), jnp.float32)
        self._draft_sample_fn = jax.jit(draft_sample, static_argnames=("modes",), donate_argnums=(2,))
        self._verify_fn = jax.jit(verify, static_argnames=("modes",))
        super().__init__(runner, scheduler, tokenizer, eos_token_ids, vocab_size)

    def num_target_logits(self, num_tokens_padded: int, num_seqs_padded: int) -> int:
        """Logits rows of a verification step: one per draft token plus one per row, never
        more than the step has tokens."""
        return min(num_tokens_padded, num_seqs_padded * (self.gamma + 1))

    # -- warm-up ---------------------------------------------------------------------

    def warmup(self, progress: Callable | None = None) -> None:
        """Compile every shape a speculative step can use: the target's verification step and
        `verify` for each bucket pair, the draft's step for each pair and `draft_sample` for
        each seqs bucket, each sampler function in its three compiled variants."""
        target_pairs = self.runner.shape_pairs()
        draft_pairs = self.draft_runner.shape_pairs()
        draft_seq_buckets = sorted({s for _, s in draft_pairs})
        variants = len(SAMPLER_WARMUP_PARAMS)
        total = len(target_pairs) * (1 + variants) + len(draft_pairs) + len(draft_seq_buckets) * variants
        done = 0

        def tick(shape):
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, shape)

        self.runner.warmup_forward(self.num_target_logits, lambda i, n, shape: tick(shape))
        self.draft_runner.warmup_forward(lambda t, s: s, lambda i, n, shape: tick(shape))
        gamma = self.gamma
        for t, s in target_pairs:
            num_logits = self.num_target_logits(t, s)
            logits = jax.device_put(np.zeros((num_logits, self.vocab_size), np.float32))
            for params in SAMPLER_WARMUP_PARAMS:
                arrays, modes = self._sampling_arrays([params], [([0], 1)], [0], [0], num_logits)
                jax.block_until_ready(self._run_verify(
                    logits, arrays, modes, np.zeros(s, np.int32), np.zeros((s, gamma + 1), np.int32),
                    np.zeros((s, gamma), np.int32), np.zeros(s, np.int32)))
                tick((t, s))
        for s in draft_seq_buckets:
            logits = jax.device_put(np.zeros((s, self.vocab_size), np.float32))
            for params in SAMPLER_WARMUP_PARAMS:
                arrays, modes = self._sampling_arrays([params], [([0], 1)], [0], [0], s)
                jax.block_until_ready(self._run_draft_sample(logits, arrays, modes, np.full(s, self._q_rows, np.int32), 0))
                tick((0, s))

    @staticmethod
    def _sampling_arrays(params, histories, steps, seeds, num_rows):
        return compiled_sampler_variant(*build_sampling_arrays(params, histories, steps, num_rows=num_rows, seeds=seeds))

    def _run_draft_sample(self, logits, arrays, modes, q_rows, position: int) -> jax.Array:
        inputs = jax.device_put((arrays, np.asarray(q_rows, np.int32), np.int32(position)))
        ids, self._q_buffer = self._draft_sample_fn(logits, inputs[0], self._q_buffer, inputs[1], inputs[2],
                                                    modes=modes)
        return ids

    def _run_verify(self, logits, arrays, modes, q_rows, logit_rows, draft_ids, num_draft) -> VerifyResult:
        inputs = jax.device_put((arrays, q_rows, logit_rows, draft_ids, num_draft))
        return self._verify_fn(logits, inputs[0], self._q_buffer, *inputs[1:], modes=modes)

    # -- one step --------------------------------------------------------------------

    def step(self) -> None:
        output = self.scheduler.schedule()
        for seq in output.finished_aborted:
            self._finish(seq, seq.finish_reason or "length", None, already_freed=True)
        for seq in output.preempted:  # its blocks are gone: on re-admission it starts like a new one
            self._draft_computed.pop(seq.seq_id, None)
        if output.is_empty:
            self._update_gauges()
            return
        prompt_tokens = sum(n for seq, n in output.scheduled if not seq.is_decoding)
        rows = self._plan(output.scheduled)
        self._propose(rows)
        self._verify(rows)
        generated = self._commit(rows)
        running = {seq.seq_id for seq in self.scheduler.running}
        for seq_id in [s for s in self._draft_computed if s not in running]:  # finished or aborted
            del self._draft_computed[seq_id]
        self.metrics.record_step(prompt_tokens, generated)
        self._update_gauges()

    def _plan(self, scheduled: list[tuple[Sequence, int]]) -> list[_Row]:
        """Rows in scheduler order, each with its lookahead and the blocks for it."""
        rows = []
        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            row = _Row(seq, start, num_new, draft_start=min(self._draft_computed.get(seq.seq_id, start), start))
            if row.completes:
                row.lookahead = self._lookahead(seq, num_new)
                if row.lookahead and not self.block_manager.allocate_for(seq, num_new + row.lookahead):
                    row.lookahead = 0
            rows.append(row)
        # Longest lookahead first: draft pass j then runs a prefix of the speculating rows.
        for q_row, row in enumerate(sorted((r for r in rows if r.lookahead), key=lambda r: -r.lookahead)):
            row.q_row = q_row
        return rows

    def _lookahead(self, seq: Sequence, num_new: int) -> int:
        """Draft tokens `seq` can use: the step appends up to lookahead + 1 tokens, which must
        stay within max_tokens and max_model_len, and their KV slots must fit the pool now."""
        lookahead = self.gamma
        if seq.params.max_tokens is not None:
            lookahead = min(lookahead, seq.params.max_tokens - seq.num_output_tokens - 1)
        lookahead = min(lookahead, self.scheduler.max_model_len - seq.num_tokens - 1,
                        self.block_manager.num_tokens_fitting(seq) - num_new)
        return max(lookahead, 0)

    def _propose(self, rows: list[_Row]) -> None:
        """Draft passes: pass 0 brings every row's draft KV up to its chunk's end and draws
        draft token 1; pass j draws token j + 1 from draft token j."""
        speculating = sorted((r for r in rows if r.lookahead), key=lambda r: r.q_row)
        if not speculating:
            # Still feed the draft this step's tokens, so its KV keeps up with the target's.
            pass_rows = sorted(rows, key=lambda r: r.chunk_end - r.draft_start != 1)
            runs = [(r.seq.token_ids[r.draft_start:r.chunk_end], r.draft_start, r.seq.block_table) for r in pass_rows]
            shape = self.draft_runner.padded_shape(sum(len(run[0]) for run in runs), len(runs))
            self.draft_runner.forward(runs, shape, self._last_token_indices(runs, shape[1]))
            return
        for j in range(speculating[0].lookahead):
            if j == 0:
                pass_rows = sorted(rows, key=lambda r: r.chunk_end - r.draft_start != 1)  # one-token runs first
                runs = [(r.seq.token_ids[r.draft_start:r.chunk_end], r.draft_start, r.seq.block_table)
                        for r in pass_rows]
            else:
                pass_rows = [r for r in speculating if r.lookahead > j]
                runs = [([r.drafts[-1]], r.chunk_end + j - 1, r.seq.block_table) for r in pass_rows]
            shape = self.draft_runner.padded_shape(sum(len(run[0]) for run in runs), len(runs))
            logits = self.draft_runner.forward(runs, shape, self._last_token_indices(runs, shape[1]))
            drawing = [r if r.lookahead > j else None for r in pass_rows]
            arrays, modes = self._sampling_arrays(
                [r.seq.params if r else None for r in drawing],
                [_history(r.seq, r.drafts) if r else None for r in drawing],
                [r.seq.num_output_tokens + j if r else 0 for r in drawing],
                [r.seq.seed if r else 0 for r in drawing], shape[1])
            q_rows = np.full(shape[1], self._q_rows, np.int32)  # out of range: not stored
            q_rows[:len(drawing)] = [r.q_row if r else self._q_rows for r in drawing]
            ids = np.asarray(jax.device_get(self._run_draft_sample(logits, arrays, modes, q_rows, j)))
            for row, token in zip(drawing, ids):
                if row is not None:
                    row.drafts.append(int(token))

    @staticmethod
    def _last_token_indices(runs, num_rows: int) -> np.ndarray:
        indices = np.zeros(num_rows, np.int32)
        indices[:len(runs)] = np.cumsum([len(run[0]) for run in runs]) - 1
        return indices

    def _verify(self, rows: list[_Row]) -> None:
        """The target step over every row's chunk + drafts, then `verify`; fills row.tokens."""
        gamma = self.gamma
        order = sorted(rows, key=lambda r: r.num_new + r.lookahead != 1)  # one-token runs first
        runs = [(r.seq.token_ids[r.start:r.chunk_end] + r.drafts, r.start, r.seq.block_table) for r in order]
        shape = self.runner.padded_shape(sum(len(run[0]) for run in runs), len(runs))
        num_logits = self.num_target_logits(*shape)
        logits_indices = np.zeros(num_logits, np.int32)
        logit_rows = np.zeros((shape[1], gamma + 1), np.int32)
        q_rows = np.zeros(shape[1], np.int32)
        draft_ids = np.zeros((shape[1], gamma), np.int32)
        num_draft = np.zeros(shape[1], np.int32)
        params, histories, steps, seeds = [], [], [], []
        offset = 0
        for i, row in enumerate(order):
            row.result_row = i
            seq = row.seq
            for j in range(row.lookahead + 1):
                entry = len(params)
                logits_indices[entry] = offset + row.num_new - 1 + j
                logit_rows[i, j:] = entry
                sampled_here = row.completes
                params.append(seq.params if sampled_here else None)
                histories.append(_history(seq, row.drafts[:j]) if sampled_here else None)
                steps.append(seq.num_output_tokens + j)
                seeds.append(seq.seed)
            offset += row.num_new + row.lookahead
            q_rows[i] = row.q_row
            draft_ids[i, :row.lookahead] = row.drafts
            num_draft[i] = row.lookahead
        logits = self.runner.forward(runs, shape, logits_indices)
        arrays, modes = self._sampling_arrays(params, histories, steps, seeds, num_logits)
        result = self._run_verify(logits, arrays, modes, q_rows, logit_rows, draft_ids, num_draft)
        wants_logprobs = any(r.seq.params.logprobs is not None for r in rows)
        host = jax.device_get(result if wants_logprobs else result[:2])
        self._logprob_arrays = host[2:] if wants_logprobs else None
        for row in order:
            if row.completes:
                accepted = int(host[0][row.result_row])
                row.tokens = [int(t) for t in host[1][row.result_row, :accepted + 1]]

    def _commit(self, rows: list[_Row]) -> int:
        """Append each row's tokens through the engine's postprocessing and roll the KV
        bookkeeping back past rejected drafts. Returns the tokens appended."""
        generated = 0
        block_manager = self.block_manager
        for row in rows:
            seq = row.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if not row.completes:  # a partial prefill chunk, run by both models
                seq.num_computed_tokens = row.chunk_end
                block_manager.commit_full_blocks(seq)
                self._draft_computed[seq.seq_id] = row.chunk_end
                continue
            accepted = len(row.tokens) - 1
            if row.lookahead:
                self.num_speculative_steps += 1
                self.num_draft_tokens += row.lookahead
                self.num_accepted_tokens += accepted
            target_computed = row.chunk_end + accepted
            # The draft ran the chunk and drafts 1..k-1: all but the last of a full run.
            draft_computed = row.chunk_end + min(max(row.lookahead - 1, 0), accepted)
            self._draft_computed[seq.seq_id] = draft_computed
            for position, token in enumerate(row.tokens):
                seq.append_token(token)
                # Register full blocks only where both models' KV is written.
                seq.num_computed_tokens = min(target_computed, draft_computed, seq.num_tokens)
                block_manager.commit_full_blocks(seq)
                seq.num_computed_tokens = min(target_computed, seq.num_tokens)
                if seq.num_tokens >= self.scheduler.max_model_len:
                    self.scheduler.finish(seq, LENGTH)
                self._postprocess(seq, self._token_result(row, position, token), 0)
                generated += 1
                if seq.is_finished:
                    break
            else:
                self._release_unused_blocks(seq)
        return generated

    def _token_result(self, row: _Row, position: int, token: int) -> StepResult:
        """A one-row StepResult for `_postprocess` (logprobs included when asked)."""
        if row.seq.params.logprobs is None or self._logprob_arrays is None:
            return StepResult(np.array([token], np.int32))
        logprobs, top_ids, top_logprobs = self._logprob_arrays
        i = row.result_row
        return StepResult(np.array([token], np.int32), logprobs[i, position:position + 1],
                          top_ids[i, position][None], top_logprobs[i, position][None])

    def _release_unused_blocks(self, seq: Sequence) -> None:
        """Give back blocks that only held rejected drafts' KV (beyond the sequence's tokens).
        A --no-paged-attn slot belongs to its sequence for its whole life: nothing to give."""
        if not isinstance(self.block_manager, BlockManager):
            return
        keep = self.block_manager.blocks_needed(seq.num_tokens)
        if len(seq.block_table) > keep:
            # Positions past the sequence's tokens: none of these blocks is in the prefix cache.
            self.block_manager.release_blocks(seq.block_table[keep:], owner=seq)
            del seq.block_table[keep:]

    # -- metrics ---------------------------------------------------------------------

    def _update_gauges(self) -> None:
        super()._update_gauges()
        proposed = self.num_draft_tokens
        self.metrics.set_gauges(
            spec_gamma=self.gamma,
            spec_draft_tokens_total=proposed,
            spec_accepted_tokens_total=self.num_accepted_tokens,
            spec_acceptance_rate=self.num_accepted_tokens / proposed if proposed else 0.0,
            # Tokens per speculating row-step: accepted drafts + the final token.
            spec_tokens_per_step=(self.num_accepted_tokens / self.num_speculative_steps + 1.0
                                  if self.num_speculative_steps else 0.0),
        )


# ------------------------------------------------------------------------------- loading


@dataclass
class DraftModel:
    model: Any
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    isq_type: str | None


def load_draft_model(model: str, gguf_file: str | None = None, *, token_source: str = "cache",
                     revision: str | None = None, dtype: str = "auto", cpu_weights: str = "f32",
                     isq: str | int | None = None) -> DraftModel:
    """Load a draft model (a .gguf file, a repo/dir holding GGUFs, or a safetensors dir/repo),
    ISQ'd to `isq` when given, as `LLM` loads its target."""
    from ..loading.gguf import GGUFFile
    from ..loading.hub import resolve_model_files
    from ..loading.tokenizer import load_tokenizer
    from ..loading.gguf_weights import build_model_from_gguf
    from ..loading.safetensors import build_model_from_hf
    from ..models.model_config import config_from_gguf
    from ..models.registry import check_gguf_architecture
    from ..quant.isq import normalize_isq_type, wrap_factory

    isq_type = normalize_isq_type(isq) if isq is not None else None
    resolved = resolve_model_files(model, gguf_file=gguf_file, token_source=token_source, revision=revision,
                                   kind="gguf" if gguf_file or str(model).endswith(".gguf") else "auto")
    factories = []

    def wrap(make_linear):
        factories.append(wrap_factory(make_linear, isq_type))
        return factories[-1]

    if resolved.kind == "plain":
        from ..loading.safetensors import load_hf_config

        config = load_hf_config(resolved.model_dir)
        tokenizer = load_tokenizer(resolved.model_dir)
        built = build_model_from_hf(resolved.model_dir, config, dtype=dtype, wrap_linear=wrap if isq_type else None)
    else:
        gguf = GGUFFile(resolved.gguf_path)
        check_gguf_architecture(resolved.gguf_path, gguf.architecture)
        config = config_from_gguf(gguf.metadata, resolved.gguf_path)
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        built = build_model_from_gguf(gguf, config, cpu_weights=cpu_weights, dtype=dtype,
                                      wrap_linear=wrap if isq_type else None)
    for factory in factories:
        factory.close()
        log.info("draft ISQ %s: %s", isq_type, factory.summary())
    return DraftModel(built, config, tokenizer, resolved.display_name, isq_type)


def check_draft_vocabulary(target_tokenizer: Tokenizer, target_config: ModelConfig, draft: DraftModel) -> None:
    """The draft must speak the target's token ids: same vocabulary, same logits width."""
    if draft.config.vocab_size != target_config.vocab_size:
        raise ModelLoadError(
            f"the draft model {draft.name} has {draft.config.vocab_size} token ids but the target has "
            f"{target_config.vocab_size}: speculative decoding needs a draft with the target's tokenizer "
            f"(e.g. a smaller model of the same family, or a more quantized copy of the target)")
    target_vocab = target_tokenizer.backend.get_vocab(with_added_tokens=True)
    draft_vocab = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if target_vocab != draft_vocab:
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])[:3]
        raise ModelLoadError(
            f"the draft model {draft.name} has a different vocabulary from the target's "
            f"(first differences: {differing}): speculative decoding needs a draft with the target's tokenizer")


def kv_bytes_per_token(config: ModelConfig, bytes_per_elem: int = 4) -> int:
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * bytes_per_elem


def shared_pool_num_blocks(target_num_blocks: int, target_config: ModelConfig, draft_config: ModelConfig,
                           token_budget_given: bool) -> int:
    """Blocks of the shared pool when a draft cache rides along with the target's.

    A token budget (--pa-ctxt-len) is kept: each cache gets that many tokens. A memory
    budget (the default, --pa-gpu-mem*) is split so both caches together stay within it.
    `target_num_blocks` is `kv_cache_num_blocks` for the target alone (null block included).
    """
    if token_budget_given:
        return target_num_blocks
    target, draft = kv_bytes_per_token(target_config), kv_bytes_per_token(draft_config)
    return max(2, (target_num_blocks - 1) * target // (target + draft)) + 1
