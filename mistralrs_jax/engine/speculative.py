"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023): the
`DraftProposer` proposes tokens; the target verifies them (`runner.execute(...,
proposal=...)`, math in `rejection_sampler.py`). One engine step:

1. The scheduler decides ``{sequence: tokens}`` as usual and reserves KV slots for up to
   ``gamma`` draft tokens per sequence whose chunk completes its known tokens
   (``SchedulerOutput.lookahead``; fewer near ``max_tokens`` or ``max_model_len``, or when
   the pool is short; a partial prefill chunk gets none).
2. `DraftProposer.propose`: draft pass 1 runs, on the draft's own KV cache, each row's
   tokens the draft has not seen (the target's prefill chunk, or the pending token, plus
   the one it missed last step) and samples draft token 1; passes 2..k feed each draft
   token back and sample the next. The draft distributions q stay on the device; only the
   ids come back.
3. The target runs each row's chunk followed by its draft tokens in one step and verifies
   them on the device: accepted drafts plus one final token per row come back.
4. `Scheduler.update_after_step` appends them one at a time (EOS, stop tokens and
   max_tokens end a run midway), drops ``num_computed_tokens`` back past rejected
   positions (their KV is overwritten later) and gives back the blocks only the rejected
   tail used; the engine streams them and watches for stop strings.

KV: both models share the block manager, so a sequence has one block table that indexes
two caches (the target's and the draft's, each ``num_blocks`` blocks). The draft lags the
target by at most one token (the last draft token of a fully accepted run was never fed
to the draft); the next pass 1 catches up. Prefix-cache blocks are registered only once
the draft's KV in them is complete too (`DraftProposer.after_step` says how far), so a
shared prefix serves both models.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np

from ..config import DEFAULT_SPECULATIVE_GAMMA
from ..errors import ModelLoadError, NotSupportedError
from .rejection_sampler import draft_sample
from .runner import SAMPLER_WARMUP_PARAMS, ModelRunner, penalty_history, step_sampling_arrays
from .scheduler import SchedulerOutput
from .sequence import Sequence

if TYPE_CHECKING:
    from ..loading.model_loader import LoadedModel

log = logging.getLogger(__name__)

# Draft tokens per step. mistral.rs' TOML default is 32. A step yields (1 - a^(g+1)) / (1 - a)
# tokens on average for acceptance a (Leviathan et al.): at a = 0.8 that is 3.4 tokens for
# g = 4 and at most 5 for any g, while every draft token costs a draft pass, a target logits
# row and max_seqs x vocab floats of device memory for q. So a handful, not 32.
DEFAULT_GAMMA = DEFAULT_SPECULATIVE_GAMMA


@dataclass
class DraftProposal:
    """What the target's verification step needs of one step's drafts."""

    drafts: dict[int, list[int]]  # seq_id -> its draft tokens (none for rows that do not speculate)
    q_rows: dict[int, int]  # seq_id -> its row of q_buffer
    q_buffer: jax.Array  # f32[max_seqs, gamma, V]: the distributions the drafts were drawn from


@dataclass
class _Row:
    """One scheduled sequence in a draft step."""

    seq: Sequence
    draft_start: int  # first position whose draft KV is missing
    chunk_end: int  # num_computed_tokens after the target's chunk
    lookahead: int  # draft tokens it proposes this step (k)
    q_row: int = 0
    drafts: list[int] = field(default_factory=list)


class DraftProposer:
    """Proposes up to ``gamma`` tokens per sequence with a draft model that shares the
    target's block tables (`draft_runner` has the target runner's block layout)."""

    def __init__(self, draft_runner: ModelRunner, gamma: int, vocab_size: int, max_rows: int):
        """`max_rows`: the most sequences a step can hold (the target runner's largest seqs bucket)."""
        if gamma < 1:
            raise NotSupportedError(f"speculative decoding needs gamma >= 1 draft tokens per step, got {gamma}")
        self.draft_runner = draft_runner
        self.gamma = gamma
        self.vocab_size = vocab_size
        self.num_draft_tokens = 0  # proposed draft tokens the target checked
        self.num_accepted_tokens = 0
        self.num_speculative_steps = 0  # row-steps that proposed at least one token
        self._draft_computed: dict[int, int] = {}  # seq_id -> positions whose draft KV is written
        self._q_rows = max_rows
        # Under -tp placed as the runners' logits are (replicated over the mesh), so no call recompiles.
        self._q_buffer = jax.device_put(np.zeros((max_rows, gamma, vocab_size), np.float32),
                                        draft_runner._logits_sharding)
        self._draft_sample_fn = jax.jit(draft_sample, static_argnames=("modes",), donate_argnums=(2,))

    # -- one step --------------------------------------------------------------------

    def propose(self, output: SchedulerOutput) -> DraftProposal:
        """Draft passes: pass 0 brings every row's draft KV up to its chunk's end and draws
        draft token 1 for the rows with lookahead; pass j draws token j + 1 from token j."""
        for seq in output.preempted:  # its blocks are gone: on re-admission it starts like a new one
            self._draft_computed.pop(seq.seq_id, None)
        rows = []
        for seq, num_new in output.scheduled:
            start = seq.num_computed_tokens
            rows.append(_Row(seq, min(self._draft_computed.get(seq.seq_id, start), start), start + num_new,
                             output.lookahead.get(seq.seq_id, 0)))
        # Longest lookahead first: draft pass j then runs a prefix of the speculating rows.
        speculating = sorted((r for r in rows if r.lookahead), key=lambda r: -r.lookahead)
        for q_row, row in enumerate(speculating):
            row.q_row = q_row
        for j in range(max(1, speculating[0].lookahead if speculating else 0)):
            if j == 0:  # every row: the draft's KV keeps up with the target's even without drafts
                pass_rows = rows
                runs = [(r.seq.token_ids[r.draft_start:r.chunk_end], r.draft_start, r.seq.block_table) for r in rows]
            else:
                pass_rows = [r for r in speculating if r.lookahead > j]
                runs = [([r.drafts[-1]], r.chunk_end + j - 1, r.seq.block_table) for r in pass_rows]
            shape = self.draft_runner.padded_shape(sum(len(run[0]) for run in runs), len(runs))
            logits = self.draft_runner.forward(runs, shape, [1] * len(runs), shape[1])
            drawing = [r if r.lookahead > j else None for r in pass_rows]
            if not any(drawing):
                continue
            arrays, modes = step_sampling_arrays(
                [r.seq.params if r else None for r in drawing],
                [penalty_history(r.seq, r.drafts) if r else None for r in drawing],
                [r.seq.num_output_tokens + j if r else 0 for r in drawing],
                [r.seq.seed if r else 0 for r in drawing], shape[1])
            q_rows = np.full(shape[1], self._q_rows, np.int32)  # out of range: not stored
            q_rows[:len(drawing)] = [r.q_row if r else self._q_rows for r in drawing]
            ids = np.asarray(jax.device_get(self._draw(logits, arrays, modes, q_rows, j)))
            for row, token in zip(drawing, ids):
                if row is not None:
                    row.drafts.append(int(token))
        return DraftProposal({r.seq.seq_id: r.drafts for r in speculating},
                             {r.seq.seq_id: r.q_row for r in speculating}, self._q_buffer)

    def _draw(self, logits, arrays, modes, q_rows, position: int) -> jax.Array:
        inputs = jax.device_put((arrays, np.asarray(q_rows, np.int32), np.int32(position)))
        ids, self._q_buffer = self._draft_sample_fn(logits, inputs[0], self._q_buffer, inputs[1], inputs[2],
                                                    modes=modes)
        return ids

    def after_step(self, output: SchedulerOutput, accepted: dict[int, list[int]]) -> dict[int, int]:
        """Record what the target kept (`accepted`: seq_id -> accepted drafts + the final token,
        before `Scheduler.update_after_step` applies them); returns, per scheduled sequence,
        the positions whose draft KV is written (the prefix cache may only take blocks below)."""
        cacheable = {}
        for seq, num_new in output.scheduled:
            chunk_end = seq.num_computed_tokens + num_new
            draft_computed = chunk_end
            if chunk_end == seq.num_tokens and seq.seq_id in accepted:
                num_accepted = len(accepted[seq.seq_id]) - 1
                lookahead = output.lookahead.get(seq.seq_id, 0)
                if lookahead:
                    self.num_speculative_steps += 1
                    self.num_draft_tokens += lookahead
                    self.num_accepted_tokens += num_accepted
                # The draft ran the chunk and drafts 1..k-1: all but the last of a full run.
                draft_computed = chunk_end + min(max(lookahead - 1, 0), num_accepted)
            self._draft_computed[seq.seq_id] = cacheable[seq.seq_id] = draft_computed
        return cacheable

    def retain(self, live_seq_ids: set[int]) -> None:
        """Forget the draft progress of sequences that finished or were aborted."""
        for seq_id in [s for s in self._draft_computed if s not in live_seq_ids]:
            del self._draft_computed[seq_id]

    # -- warm-up and metrics -----------------------------------------------------------

    def _draft_seq_buckets(self) -> list[int]:
        return sorted({s for _, s in self.draft_runner.shape_pairs()})

    def num_warmup_shapes(self) -> int:
        return len(self.draft_runner.shape_pairs()) + len(self._draft_seq_buckets())

    def warmup(self, progress: Callable | None = None) -> None:
        """Compile the draft's step for each bucket pair and `draft_sample` for each seqs
        bucket in each compiled sampler variant."""
        num_pairs = len(self.draft_runner.shape_pairs())
        total = self.num_warmup_shapes()

        def tick(done, shape):
            if progress is not None:
                progress(done, total, shape)

        self.draft_runner.warmup_forward(lambda t, s: s, lambda i, n, shape: tick(i, shape))
        for i, s in enumerate(self._draft_seq_buckets()):
            logits = jax.device_put(np.zeros((s, self.vocab_size), np.float32), self.draft_runner._logits_sharding)
            for params in SAMPLER_WARMUP_PARAMS:
                arrays, modes = step_sampling_arrays([params], [([0], 1)], [0], [0], s)
                jax.block_until_ready(self._draw(logits, arrays, modes, np.full(s, self._q_rows, np.int32), 0))
            tick(num_pairs + i + 1, (0, s))

    def gauges(self) -> dict:
        proposed = self.num_draft_tokens
        return dict(
            spec_gamma=self.gamma,
            spec_draft_tokens_total=proposed,
            spec_accepted_tokens_total=self.num_accepted_tokens,
            spec_acceptance_rate=self.num_accepted_tokens / proposed if proposed else 0.0,
            # Tokens per speculating row-step: accepted drafts + the final token.
            spec_tokens_per_step=(self.num_accepted_tokens / self.num_speculative_steps + 1.0
                                  if self.num_speculative_steps else 0.0),
        )


def check_draft_vocabulary(target: "LoadedModel", draft: "LoadedModel") -> None:
    """The draft must speak the target's token ids: same vocabulary, same logits width."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ModelLoadError(
            f"the draft model {draft.name} has {draft.config.vocab_size} token ids but the target has "
            f"{target.config.vocab_size}: speculative decoding needs a draft with the target's tokenizer "
            f"(e.g. a smaller model of the same family, or a more quantized copy of the target)")
    target_vocab = target.tokenizer.backend.get_vocab(with_added_tokens=True)
    draft_vocab = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if target_vocab != draft_vocab:
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])[:3]
        raise ModelLoadError(
            f"the draft model {draft.name} has a different vocabulary from the target's "
            f"(first differences: {differing}): speculative decoding needs a draft with the target's tokenizer")
