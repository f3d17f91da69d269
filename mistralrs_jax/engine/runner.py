"""ModelRunner: turns a scheduler decision into one padded batch, runs one jitted step.

Two padding axes (design rule 1): total tokens T and sequences S, each rounded up to a
short bucket list, so every shape the step can see is known and compiled at start-up.
The KV cache (one (k, v) pair per layer, each [num_blocks * block_size, kv_heads,
head_dim]) is donated to every step and rebound from its output (rule 3). Sampling runs
on the device in a second small jitted function; only sampled ids (and logprobs when a
request asks) come back to the host (rule 6). Under speculative decoding every step is a
verification step instead: each sequence's chunk runs followed by its draft tokens, and
`rejection_sampler.verify` keeps the accepted drafts and draws one more token.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.paged_attention import DECODE_CHUNK_TOKENS, PREFILL_KEY_CHUNK

from ..config import ModelConfig
from ..dry import add_dry_bias
from ..parallel.mesh import bind_mesh, effective_kv_heads, host_staging
from pallas_kernels.paged_attention import AttentionMetadata
from ..sampling_params import MAX_LOGIT_BIAS_ENTRIES, MAX_TOP_LOGPROBS, SamplingParams
from ..models.lora_layers import one_hot_scalings
from .buckets import round_up_to_bucket
from .multimodal import step_input_embeds
from .rejection_sampler import verify
from .sampler import (HISTORY_WIDTH_BUCKETS, PENALTY_WINDOW, SamplerModes, SamplingArrays, build_sampling_arrays,
                      sample)
from .sequence import Sequence

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUCKETS = [2, 8, 32, 128, 512]
DEFAULT_SEQ_BUCKETS = [1, 8, 32, 128]
# A 1-token step is pathological on XLA:CPU (0.10.2): the KV scatter followed by the
# gather of the same cache stops being in place and costs ~10 ms per layer, against
# ~0.3 ms with 2 tokens. Batch-1 decode therefore pads to 2 tokens (the pad writes to
# the trash block); the extra matmul row is free in a memory-bound step.
MIN_TOKEN_BUCKET = 2
# build_sampling_arrays gives penalized rows their last PENALTY_WINDOW tokens, in this width.
FULL_VARIANT_HISTORY_WIDTH = round_up_to_bucket(HISTORY_WIDTH_BUCKETS, PENALTY_WINDOW)
# One request per compiled sampler variant (see compiled_sampler_variant).
SAMPLER_WARMUP_PARAMS = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, repetition_penalty=1.1, logit_bias={0: 1.0}, logprobs=1),
)


def compiled_sampler_variant(arrays: SamplingArrays, modes: SamplerModes) -> tuple[SamplingArrays, SamplerModes]:
    """Map a step's sampler modes onto one of three compiled variants.

    `SamplerModes` alone spans ~100 static combinations per seqs bucket (filters,
    penalties, four logit-bias widths, four logprob widths): far too many to compile at
    start-up, and compiling one lazily stalls every request in flight for seconds. So
    only three are ever used: all-greedy; sampled (filters on); and "full" (filters,
    penalties, logit bias and top logprobs at their widest) for any step where some row
    asks for penalties, a bias or top logprobs. Turning a feature on for rows that do
    not use it changes nothing they get (neutral penalties multiply by 1 and subtract
    0, padding bias ids are dropped, unset filters keep every token, greedy rows take
    the argmax whatever the others do), and the extra work is a few scatters and a
    top-20 over [S, V], small next to the model step.
    """
    full = modes.use_penalties or modes.use_bias or modes.num_logprobs > 0
    if not full:
        return arrays, SamplerModes(all_greedy=modes.all_greedy, use_filters=not modes.all_greedy,
                                    use_penalties=False, use_bias=False, num_logprobs=0)
    num_rows = arrays.temperature.shape[0]

    def widen(values, width, fill):
        padded = np.full((num_rows, width), fill, values.dtype)
        padded[:, :values.shape[1]] = values
        return padded

    arrays = dataclasses.replace(
        arrays,
        history_tokens=widen(arrays.history_tokens, FULL_VARIANT_HISTORY_WIDTH, -1),
        history_is_output=widen(arrays.history_is_output, FULL_VARIANT_HISTORY_WIDTH, False),
        bias_token_ids=widen(arrays.bias_token_ids, MAX_LOGIT_BIAS_ENTRIES, -1),
        bias_values=widen(arrays.bias_values, MAX_LOGIT_BIAS_ENTRIES, 0.0),
    )
    return arrays, SamplerModes(all_greedy=False, use_filters=True, use_penalties=True, use_bias=True,
                                num_logprobs=MAX_TOP_LOGPROBS)


def _embeds_kwargs(input_embeds) -> dict:
    """Model keyword arguments of the image-features step variant (none for the text-only one)."""
    if input_embeds is None:
        return {}
    embeds, mask = input_embeds
    return {"input_embeds": embeds, "embeds_mask": mask}


def step_sampling_arrays(params, histories, steps, seeds, num_rows: int) -> tuple[SamplingArrays, SamplerModes]:
    """`build_sampling_arrays` mapped onto its compiled variant (see `compiled_sampler_variant`)."""
    return compiled_sampler_variant(*build_sampling_arrays(params, histories, steps, num_rows=num_rows, seeds=seeds))


def penalty_history(seq: Sequence, extra: list[int] = ()) -> tuple[list[int], int]:
    """(tokens, number of prompt tokens among them) for `build_sampling_arrays`: the tail of
    ``seq``'s tokens the penalty window can see, followed by `extra` (draft) tokens."""
    if not seq.params.uses_penalties:
        return [], 0
    tail = seq.token_ids[-PENALTY_WINDOW:]
    return tail + list(extra), seq.num_prompt_tokens - (seq.num_tokens - len(tail))


def decode_first(run_lengths: list[int]) -> list[int]:
    """The batch order of a step's runs: one-token runs first (the attention kernels' decode
    section), the rest after, each group in the given order. The one place this is decided."""
    return sorted(range(len(run_lengths)), key=lambda i: run_lengths[i] != 1)


@dataclass
class StepResult:
    """What one step produced for each scheduled row, in the order of `scheduled`.

    Row i's new tokens are ``token_ids[i, :num_tokens[i]]``: the sampled token, or under
    speculative decoding the accepted draft tokens followed by the final one. Logprobs
    (only when some row asked for them) are indexed the same way. A partial prefill
    chunk's row holds a token too, which the scheduler ignores.
    """

    token_ids: np.ndarray  # i32[n, P]
    num_tokens: np.ndarray  # i32[n], 1 <= num_tokens <= P
    logprobs: np.ndarray | None = None  # f32[n, P]: the token's log_softmax(raw logits)
    top_ids: np.ndarray | None = None  # i32[n, P, k]
    top_logprobs: np.ndarray | None = None  # f32[n, P, k]

    def tokens(self, row: int) -> list[int]:
        return [int(t) for t in self.token_ids[row, :self.num_tokens[row]]]

    @classmethod
    def one_token_per_row(cls, token_ids, logprobs=None, top_ids=None, top_logprobs=None) -> "StepResult":
        token_ids = np.asarray(token_ids)
        expand = (lambda a: None if a is None else np.asarray(a)[:, None])
        return cls(token_ids[:, None], np.ones(len(token_ids), np.int32), expand(logprobs), expand(top_ids),
                   expand(top_logprobs))


class ModelRunner:
    def __init__(
        self,
        model: nnx.Module,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        token_buckets: list[int] | None = None,
        seq_buckets: list[int] | None = None,
        kv_dtype=jnp.float32,
        input_embeds: bool = False,
        num_lookahead_tokens: int = 0,
        mesh=None,
    ):
        """`input_embeds`: the model also takes image features in place of token embeddings
        (vision models): a second step variant, compiled at warm-up too (engine/multimodal.py).
        `num_lookahead_tokens` (gamma) > 0: every step verifies draft tokens (speculative
        decoding, `execute(..., proposal=...)`), and warm-up compiles that step instead.
        `mesh` (parallel.mesh.make_mesh): tensor parallelism over its "tp" axis; the weights
        are split per parallel/rules.py, the KV cache over its KV heads, logits come back whole."""
        self.mesh = mesh
        self.tp_size = 1 if mesh is None else int(mesh.size)
        self.tp_relaid_out = 0  # projections parallel.rules.prepare_model replaced by re-laid-out copies
        self.config = config
        self.num_lookahead_tokens = num_lookahead_tokens
        self.input_embeds = input_embeds
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.token_buckets = sorted({max(MIN_TOKEN_BUCKET, t) for t in (token_buckets or DEFAULT_TOKEN_BUCKETS)
                                     if t < max_num_batched_tokens} | {max(MIN_TOKEN_BUCKET, max_num_batched_tokens)})
        self.seq_buckets = sorted({s for s in (seq_buckets or DEFAULT_SEQ_BUCKETS) if s < max_num_seqs} | {max_num_seqs})
        self.kv_caches = self._zero_caches(num_blocks, kv_dtype)
        # What a compile needs of the cache: its avals (the cache itself is rebound by every step).
        # (No sharding in it on one device: a step's call leaves the cache's sharding unspecified,
        # and a compile for a specified one would be another program. Under tp it is the split.)
        self._kv_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=a.sharding if mesh is not None else None), self.kv_caches)
        self.compiled_pairs: set[tuple[int, int]] = set()  # (tokens, seqs) pairs whose step is compiled
        # Adapter slots of per-request LoRA (set before warm-up); 0: steps take no adapter slots.
        self.num_lora_slots = 0
        self._warmed_samplers: set[int] = set()  # seqs buckets whose sampler variants are compiled
        self._sample_fn = jax.jit(sample, static_argnames=("modes",))
        self._verify_fn = jax.jit(verify, static_argnames=("modes",))
        self._free_bitmasks: dict[int, jax.Array] = {}  # num_rows -> all-ones token bitmask
        self.rebind_model(model)

    def rebind_model(self, model: nnx.Module) -> None:
        """Take `model`'s current weights and structure, with fresh jitted step/score functions.

        Used at start and after runtime re-quantization (LLM.re_isq), where array shapes and
        static fields (a Linear's group size) change, so the old traces cannot be reused.
        Call `warmup()` afterwards so no request waits on the recompile.
        """
        if self.mesh is not None:
            from ..parallel.rules import prepare_model

            with host_staging(self.tp_size):  # rebuilt projections stay on the host until placed
                # Split fused projections, replicate scarce KV heads (LLM.re_isq refuses such a model).
                self.tp_relaid_out = max(self.tp_relaid_out, prepare_model(model, self.tp_size))
        self.graphdef, state = nnx.split(model)
        # Pass the weights as a flat list of arrays and close over the graph definition:
        # hashing a GraphDef and flattening an nnx.State on every call cost ~20 ms per step.
        self.state_leaves, self._state_treedef = jax.tree.flatten(state)
        outputs, self._logits_sharding = {}, None
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            from ..parallel.rules import shard_state

            self.state_leaves = shard_state(model, state, self.mesh)
            whole = self._logits_sharding = NamedSharding(self.mesh, PartitionSpec())  # gathered for the sampler
            outputs = {"out_shardings": (whole, jax.tree.map(lambda a: a.sharding, self.kv_caches))}
        self._step_fn = bind_mesh(jax.jit(self._step, donate_argnums=(1,), **outputs), self.mesh)
        self._score_fn = bind_mesh(jax.jit(self._score, **({"out_shardings": outputs["out_shardings"][0]}
                                                            if outputs else {})), self.mesh)
        self.compiled_pairs = set()

    # -- per-request LoRA (models/lora_layers.py, loading/adapters/unmerged.py) ---------------

    def _adapter_kwargs(self, adapter_slots) -> dict:
        """Model keywords for the step's per-token adapter slots (none without unmerged adapters)."""
        if adapter_slots is None:
            return {}
        return {"adapter_scalings": one_hot_scalings(adapter_slots, self.num_lora_slots)}

    def adapter_slots(self, slots_by_row: list[int], token_seq: np.ndarray) -> tuple:
        """() without unmerged adapters; else (slots [T] int32,): row i of `decode_first` order
        has slot slots_by_row[i] (-1: base model), padding tokens that of the row they point at."""
        if not self.num_lora_slots:
            return ()
        rows = np.full(int(token_seq.max(initial=0)) + 1, -1, np.int32)
        rows[:len(slots_by_row)] = slots_by_row
        return (rows[np.asarray(token_seq)],)

    def _scheduled_slots(self, scheduled: list[tuple[Sequence, int]]) -> list[int]:
        order = decode_first([n for _, n in scheduled])
        return [getattr(scheduled[i][0], "lora_slot", -1) for i in order]

    def refresh_adapter_weights(self, model: nnx.Module) -> None:
        """Take the current arrays of `model`'s adapter stacks (a slot was loaded or cleared): the
        same shapes, so no step compiles again. The other weights stay as the runner holds them."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model))
        if treedef != self._state_treedef:
            raise RuntimeError("the model's structure changed; rebind_model it instead")
        leaves = list(self.state_leaves)
        for i, (path, leaf) in enumerate(flat):
            if any(getattr(key, "key", None) == "lora" for key in path):
                leaves[i] = leaf
        self.state_leaves = leaves  # one assignment: a step already running keeps the old list

    def _zero_caches(self, num_blocks: int, dtype) -> list:
        """Zeroed (k, v) caches per layer, [num_blocks * block_size, kv heads, head_dim]; under
        tp split over the KV heads (replicated up to one per device when fewer)."""
        shape = (num_blocks * self.block_size, effective_kv_heads(self.config.num_kv_heads, self.tp_size),
                 self.config.head_dim)
        device = None
        if self.mesh is not None:
            from jax.sharding import NamedSharding

            from ..parallel.rules import KV_CACHE_SPEC

            device = NamedSharding(self.mesh, KV_CACHE_SPEC)
        return [(jnp.zeros(shape, dtype, device=device), jnp.zeros(shape, dtype, device=device))
                for _ in range(self.config.num_layers)]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    def mesh_report(self) -> dict:
        """{"tensor_parallel_size", "devices", "per_device": [weight / KV bytes held, memory stats]}."""
        from ..parallel.rules import mesh_report

        devices = list(self.mesh.devices.flat) if self.mesh is not None else \
            sorted({d for leaf in self.state_leaves[:1] for d in leaf.sharding.device_set}, key=lambda d: d.id)
        return mesh_report(devices, self.state_leaves, self.kv_caches)

    # -- the jitted step -------------------------------------------------------------------

    def _model(self, state_leaves):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._state_treedef, state_leaves))

    def _step(self, state_leaves, kv_caches, input_ids, meta, logits_indices, input_embeds=None, adapter_slots=None):
        """`input_embeds`, when given, is (embeds [T, hidden], mask [T]): a separately traced variant.
        `adapter_slots` [T] int32 (per-request LoRA): each token's adapter slot, -1 for none."""
        model = self._model(state_leaves)
        hidden, kv_caches = model(input_ids, meta, kv_caches, self.block_size,
                                  **_embeds_kwargs(input_embeds), **self._adapter_kwargs(adapter_slots))
        logits = model.logits(hidden[logits_indices])
        return logits, kv_caches

    def _score(self, state_leaves, kv_caches, input_ids, meta, input_embeds=None, adapter_slots=None):
        model = self._model(state_leaves)
        hidden, _ = model(input_ids, meta, kv_caches, self.block_size, **_embeds_kwargs(input_embeds),
                          **self._adapter_kwargs(adapter_slots))
        return model.logits(hidden)

    # -- host-side batch building --------------------------------------------------------

    def max_prefill_chunks(self, num_seq_rows: int) -> int:
        return num_seq_rows * math.ceil(self.max_blocks_per_seq * self.block_size / PREFILL_KEY_CHUNK)

    def build_metadata(self, runs: list[tuple[list[int], int, list[int]]], t_pad: int, s_pad: int):
        """Arrays for one step: (input_ids [t_pad], AttentionMetadata, logits_indices [s_pad]).

        `runs` holds, per sequence, (tokens to run, position of the first, block table), in
        any order: they are laid out in `decode_first` order. ``logits_indices[i]`` is the
        flat index of run i's last token (0 for padding rows), so a sampler row i belongs to run i."""
        bs = self.block_size
        input_ids = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        # Padding tokens write into block 0 (the trash block) and attend to nothing real.
        slot_mapping = np.arange(t_pad, dtype=np.int32) % bs
        token_seq = np.full(t_pad, s_pad - 1, np.int32)
        block_tables = np.zeros((s_pad, self.max_blocks_per_seq), np.int32)
        logits_indices = np.zeros(s_pad, np.int32)
        chunk_seq = np.zeros(self.max_prefill_chunks(s_pad), np.int32)
        chunk_start = np.zeros_like(chunk_seq)
        num_chunks = num_decodes = 0
        max_decode_position = -1
        window = self.config.sliding_window
        offset = 0
        for row, run_index in enumerate(decode_first([len(run[0]) for run in runs])):
            tokens, start, table = runs[run_index]
            n = len(tokens)
            pos = np.arange(start, start + n, dtype=np.int32)
            table = np.asarray(table, np.int32)
            input_ids[offset:offset + n] = tokens
            positions[offset:offset + n] = pos
            slot_mapping[offset:offset + n] = table[pos // bs] * bs + pos % bs
            token_seq[offset:offset + n] = row
            block_tables[row, :len(table)] = table
            offset += n
            logits_indices[run_index] = offset - 1
            if n == 1 and num_decodes == row:
                num_decodes += 1
                max_decode_position = max(max_decode_position, start)
                continue
            first = max(0, start - window + 1) // PREFILL_KEY_CHUNK if window else 0
            for c in range(first, math.ceil((start + n) / PREFILL_KEY_CHUNK)):
                chunk_seq[num_chunks] = row
                chunk_start[num_chunks] = c * PREFILL_KEY_CHUNK
                num_chunks += 1
        meta = AttentionMetadata(
            positions=positions, slot_mapping=slot_mapping, token_seq=token_seq, block_tables=block_tables,
            num_decode_tokens=np.int32(num_decodes),
            num_decode_chunks=np.int32(math.ceil((max_decode_position + 1) / DECODE_CHUNK_TOKENS)),
            chunk_seq=chunk_seq, chunk_start=chunk_start, num_prefill_chunks=np.int32(num_chunks),
        )
        return input_ids, meta, logits_indices

    @staticmethod
    def _runs(scheduled: list[tuple[Sequence, int]], drafts: list[list[int]] | None = None):
        """`build_metadata` runs: each sequence's next `n` uncomputed tokens (then its draft tokens)."""
        return [(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n] + (drafts[i] if drafts else []),
                 seq.num_computed_tokens, seq.block_table) for i, (seq, n) in enumerate(scheduled)]

    # -- running ---------------------------------------------------------------------

    def execute(self, scheduled: list[tuple[Sequence, int]], constraints=None, proposal=None) -> StepResult:
        """Run one step; results come back in the order of `scheduled`. `constraints`: the engine's
        guidance.ConstraintTracker, whose grammar masks the sampler applies. `proposal` (a
        `speculative.DraftProposal`; required when ``num_lookahead_tokens`` > 0): draft tokens
        to verify after each sequence's chunk."""
        if self.num_lookahead_tokens:
            return self._execute_verify(scheduled, proposal)
        runs = self._runs(scheduled)
        shape_key = self.padded_shape(sum(len(run[0]) for run in runs), len(runs))
        input_ids, meta, logits_indices = self.build_metadata(runs, *shape_key)
        seqs = [seq for seq, _ in scheduled]
        arrays, modes = build_sampling_arrays(
            [seq.params for seq in seqs],
            [(seq.token_ids, seq.num_prompt_tokens) for seq in seqs],
            [seq.num_output_tokens for seq in seqs],
            num_rows=shape_key[1],
            seeds=[seq.seed for seq in seqs],
        )
        if constraints is not None:  # DRY penalties ride on the logit bias (mistralrs_jax/dry.py)
            arrays, modes = add_dry_bias(arrays, modes, constraints.dry_rows(seqs))
        arrays, modes = compiled_sampler_variant(arrays, modes)
        embeds = self._step_input_embeds(scheduled, shape_key[0])
        slots = self.adapter_slots(self._scheduled_slots(scheduled), meta.token_seq)
        # Host arrays go to the jitted calls as they are: jit's C++ dispatch copies them in ~2 us
        # each, where a Python-side jax.device_put of the same ~24 leaves took ~0.4 ms a step.
        inputs = (input_ids, meta, logits_indices, arrays, embeds, *slots)
        logits, self.kv_caches = self._step_fn(self.state_leaves, self.kv_caches, *inputs[:3],
                                               *(() if embeds is None and not slots else inputs[4:]))
        # The grammar masks are computed here, on the host, while the device runs the forward.
        bitmask = self._token_bitmask([seq.seq_id for seq in seqs], shape_key[1], constraints)
        out = self._sample_fn(logits, dataclasses.replace(inputs[3], token_bitmask=bitmask), modes=modes)
        n = len(seqs)
        if modes.num_logprobs or any(seq.params.logprobs is not None for seq in seqs):
            host = jax.device_get(out)
            return StepResult.one_token_per_row(host.token_ids[:n], host.logprobs[:n], host.top_ids[:n],
                                                host.top_logprobs[:n])
        return StepResult.one_token_per_row(np.asarray(jax.device_get(out.token_ids))[:n])

    def num_verify_logits(self, num_tokens_padded: int, num_seqs_padded: int) -> int:
        """Logits rows of a verification step: one per draft token plus one per row, never
        more than the step has tokens."""
        return min(num_tokens_padded, num_seqs_padded * (self.num_lookahead_tokens + 1))

    def _execute_verify(self, scheduled: list[tuple[Sequence, int]], proposal) -> StepResult:
        """One target step over each sequence's chunk followed by its draft tokens, keeping the
        logits of the chunk's last token and of every draft token; then `verify` on the device.
        Every row's sampling settings apply at every position, with the draft tokens before a
        position in its penalty history."""
        gamma = self.num_lookahead_tokens
        drafts = [proposal.drafts.get(seq.seq_id, []) for seq, _ in scheduled]
        runs = self._runs(scheduled, drafts)
        shape = self.padded_shape(sum(len(run[0]) for run in runs), len(runs))
        num_rows = shape[1]
        logit_rows = np.zeros((num_rows, gamma + 1), np.int32)
        q_rows = np.zeros(num_rows, np.int32)
        draft_ids = np.zeros((num_rows, gamma), np.int32)
        num_draft = np.zeros(num_rows, np.int32)
        params, histories, steps, seeds = [], [], [], []
        for i, ((seq, num_new), row_drafts) in enumerate(zip(scheduled, drafts)):
            samples = seq.num_computed_tokens + num_new == seq.num_tokens  # not a partial prefill chunk
            for j in range(len(row_drafts) + 1):
                logit_rows[i, j:] = len(params)
                params.append(seq.params if samples else None)
                histories.append(penalty_history(seq, row_drafts[:j]) if samples else None)
                steps.append(seq.num_output_tokens + j)
                seeds.append(seq.seed)
            q_rows[i] = proposal.q_rows.get(seq.seq_id, 0)
            draft_ids[i, :len(row_drafts)] = row_drafts
            num_draft[i] = len(row_drafts)
        num_logits = self.num_verify_logits(*shape)
        logits = self.forward(runs, shape, [len(d) + 1 for d in drafts], num_logits)
        arrays, modes = step_sampling_arrays(params, histories, steps, seeds, num_logits)
        inputs = jax.device_put((arrays, q_rows, logit_rows, draft_ids, num_draft))
        result = self._verify_fn(logits, inputs[0], proposal.q_buffer, *inputs[1:], modes=modes)
        n = len(scheduled)
        if any(seq.params.logprobs is not None for seq, _ in scheduled):
            num_accepted, token_ids, logprobs, top_ids, top_logprobs = jax.device_get(result)
            return StepResult(token_ids[:n], num_accepted[:n] + 1, logprobs[:n], top_ids[:n], top_logprobs[:n])
        num_accepted, token_ids = jax.device_get(result[:2])
        return StepResult(token_ids[:n], num_accepted[:n] + 1)

    def _token_bitmask(self, seq_ids: list[int], num_rows: int, constraints=None) -> jax.Array:
        """The sampler's fixed-shape grammar mask: the constrained rows' masks, or a cached all-ones
        device array when no row is constrained (the same shape either way: no compile)."""
        host = constraints.bitmask(seq_ids, num_rows) if constraints is not None and constraints.active else None
        if host is not None:
            return jax.device_put(host)
        free = self._free_bitmasks.get(num_rows)
        if free is None:
            words = -(-self.config.vocab_size // 32)
            free = self._free_bitmasks[num_rows] = jax.device_put(np.full((num_rows, words), -1, np.int32))
        return free

    # -- for callers that sample themselves (the draft model) -----------------------------

    def padded_shape(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """The (tokens, seqs) bucket pair a step of this many tokens and sequences runs in."""
        t_pad = round_up_to_bucket(self.token_buckets, num_tokens, "step tokens")
        return t_pad, self.seq_bucket_for(t_pad, num_seqs)

    def forward(self, runs: list[tuple[list[int], int, list[int]]], shape: tuple[int, int],
                logits_per_run: list[int], num_logits: int, lora_slots: list[int] | None = None) -> jax.Array:
        """One model step over `runs` (as `build_metadata` takes them) padded to `shape`, writing
        their KV; returns the f32 logits of the last ``logits_per_run[i]`` tokens of each run i,
        run after run, padded to `num_logits` rows and left on the device. No sampling."""
        input_ids, meta, last_token = self.build_metadata(runs, *shape)
        logits_indices = np.zeros(num_logits, np.int32)
        indices = [last_token[i] - count + 1 + j for i, count in enumerate(logits_per_run) for j in range(count)]
        logits_indices[:len(indices)] = indices
        order = decode_first([len(run[0]) for run in runs])  # `lora_slots` (per run; None: base model only)
        slots = self.adapter_slots([lora_slots[i] for i in order] if lora_slots else [], meta.token_seq)
        inputs = (input_ids, meta, logits_indices, *((None,) + slots if slots else ()))
        logits, self.kv_caches = self._step_fn(self.state_leaves, self.kv_caches, *inputs)
        return logits

    def warmup_forward(self, num_logits: Callable[[int, int], int], progress=None) -> None:
        """Compile `forward` for every bucket pair (t, s) with `num_logits(t, s)` logits rows."""
        pairs = self.shape_pairs()
        for i, (t, s) in enumerate(pairs):
            jax.block_until_ready(self.forward([], (t, s), [], num_logits(t, s)))
            if progress is not None:
                progress(i + 1, len(pairs), (t, s))

    def seq_bucket_for(self, num_tokens_padded: int, num_seqs: int | None = None) -> int:
        """The sequence axis is tied to the token axis: a step with t padded tokens holds at
        most min(t, max_seqs) sequences, so each token bucket compiles with that seq bucket.
        Extra rows only cost lm_head and sampler rows, except in the smallest bucket, where
        a batch-1 decode lives: there a 49152-wide lm_head on 8 rows took ~15 ms against
        ~5 ms on one row (a third of the step), so that bucket also compiles a one-row
        variant for single-sequence steps."""
        if num_seqs == 1 and num_tokens_padded == self.token_buckets[0] and self.seq_buckets[0] == 1:
            return 1
        return round_up_to_bucket(self.seq_buckets, min(num_tokens_padded, self.seq_buckets[-1]), "step sequences")

    def shape_pairs(self) -> list[tuple[int, int]]:
        pairs = [(t, self.seq_bucket_for(t)) for t in self.token_buckets]
        single = (self.token_buckets[0], self.seq_bucket_for(self.token_buckets[0], 1))
        return sorted(set(pairs) | {single})

    def warmup(self, progress=None, pairs: list[tuple[int, int]] | None = None, stop=None) -> None:
        """Compile the step of every (tokens, seqs) bucket pair in `pairs` (default: all of
        `shape_pairs`), and every sampler variant for each seqs bucket, so no request waits on
        a compile. Compiling never runs a step or touches the KV cache, so it may run on
        another thread while the engine serves the pairs already in `compiled_pairs`.
        `stop` (a threading.Event): give up between pairs once it is set."""
        pairs = self.shape_pairs() if pairs is None else pairs
        start = time.perf_counter()
        for i, (t, s) in enumerate(pairs):
            if stop is not None and stop.is_set():
                return
            if self.num_lookahead_tokens:
                self._warm_verify(t, s)
            else:
                self.compile_pair(t, s)
            self.compiled_pairs.add((t, s))
            if progress is not None:
                progress(i + 1, len(pairs), (t, s))
        log.debug("compiled %d step shapes %s in %.1fs", len(pairs), pairs, time.perf_counter() - start)

    def compile_pair(self, num_tokens: int, num_seqs: int) -> None:
        """Compile (ahead of time, without running it) the step of this shape, its image-features
        variant for a vision model, and, once per seqs bucket, each compiled sampler variant."""
        inputs = jax.device_put(self.build_metadata([], num_tokens, num_seqs))
        slots = jax.device_put(self.adapter_slots([], inputs[1].token_seq))
        lowered = self._step_fn.lower(self.state_leaves, self._kv_spec, *inputs, *((None,) + slots if slots else ()))
        lowered.compile()
        if self.input_embeds:  # the vision variant of the same shape
            embeds = (np.zeros((num_tokens, self.config.hidden_size), np.float32), np.zeros(num_tokens, bool))
            self._step_fn.lower(self.state_leaves, self._kv_spec, *inputs, jax.device_put(embeds), *slots).compile()
        if num_seqs in self._warmed_samplers:
            return
        logits_info = lowered.out_info[0]
        # Placed as a step leaves them (replicated over the mesh under tp), or the sampler would compile again.
        logits = jax.device_put(np.zeros(logits_info.shape, logits_info.dtype), self._logits_sharding)
        for params in SAMPLER_WARMUP_PARAMS:
            arrays, modes = compiled_sampler_variant(
                *build_sampling_arrays([params], [([0], 1)], [0], num_rows=num_seqs, seeds=[0]))
            arrays = dataclasses.replace(jax.device_put(arrays), token_bitmask=self._token_bitmask([], num_seqs))
            jax.block_until_ready(self._sample_fn(logits, arrays, modes=modes))
        self._warmed_samplers.add(num_seqs)

    def _warm_verify(self, num_tokens: int, num_seqs: int) -> None:
        """A padding-only verification step, and `verify` in each compiled sampler variant."""
        gamma = self.num_lookahead_tokens
        num_logits = self.num_verify_logits(num_tokens, num_seqs)
        logits = self.forward([], (num_tokens, num_seqs), [], num_logits)
        # The draft distributions' buffer as the proposer holds it: one row per possible sequence.
        q_buffer = jax.device_put(np.zeros((self.seq_buckets[-1], gamma, self.config.vocab_size), np.float32),
                                  self._logits_sharding)
        for params in SAMPLER_WARMUP_PARAMS:
            arrays, modes = step_sampling_arrays([params], [([0], 1)], [0], [0], num_logits)
            inputs = jax.device_put((arrays, np.zeros(num_seqs, np.int32), np.zeros((num_seqs, gamma + 1), np.int32),
                                     np.zeros((num_seqs, gamma), np.int32), np.zeros(num_seqs, np.int32)))
            jax.block_until_ready(self._verify_fn(logits, inputs[0], q_buffer, *inputs[1:], modes=modes))

    def _step_input_embeds(self, scheduled: list[tuple[Sequence, int]], num_tokens_padded: int):
        """(embeds, mask) for the image positions this step runs, or None (the text-only variant)."""
        if not self.input_embeds:
            return None
        order = decode_first([n for _, n in scheduled])  # the flat token order build_metadata lays out
        return step_input_embeds([(scheduled[i][0].multimodal, scheduled[i][0].num_computed_tokens, scheduled[i][1])
                                  for i in order], num_tokens_padded, self.config.hidden_size)

    def score(self, token_ids: list[int], multimodal=None, lora_slot: int = -1) -> np.ndarray:
        """Teacher-forced logits [len, vocab] for one sequence, on a private scratch cache.

        Lengths are padded to a power of two (at least 16) so scoring many texts compiles
        a handful of shapes, not one per length."""
        n = len(token_ids)
        bs = self.block_size
        t_pad = max(16, 1 << (n - 1).bit_length())
        num_blocks = math.ceil(t_pad / bs) + 1
        caches = self._zero_caches(num_blocks, jnp.float32)
        table = list(range(1, num_blocks))
        input_ids, meta, _ = self.build_metadata([(list(token_ids), 0, table)], t_pad, 1)
        embeds = None if multimodal is None else step_input_embeds([(multimodal, 0, n)], t_pad, self.config.hidden_size)
        slots = self.adapter_slots([lora_slot], meta.token_seq)
        logits = self._score_fn(self.state_leaves, caches, input_ids, meta,
                                *(() if embeds is None and not slots else (embeds, *slots)))
        return np.asarray(logits[:n], dtype=np.float32)
