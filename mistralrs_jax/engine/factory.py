"""`build_engine(EngineConfig, LoadedModel, draft=None)`: the engine's composition root.

It sizes the KV pool (the one place that does: from --pa-gpu-mem, --pa-gpu-mem-usage,
--pa-ctxt-len or a per-backend default, split with a draft model's cache when there is
one), picks the KV cache bookkeeping (paged, or one slot per sequence), and wires the
scheduler, the runner, the draft proposer and the engine together.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import psutil

from ..config import EngineConfig, ModelConfig
from ..errors import NotSupportedError
from ..parallel.mesh import effective_kv_heads, make_mesh
from .block_manager import BlockManager
from .contiguous_cache import ContiguousBlockManager, contiguous_pool_layout
from .engine import Engine
from .kv_cache import KVCacheManager
from .runner import ModelRunner
from .scheduler import Scheduler
from .speculative import DraftProposer, check_draft_vocabulary

if TYPE_CHECKING:
    from ..loading.model_loader import LoadedModel

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 512 << 20  # host memory for the KV cache when no budget flag is given
CPU_DEFAULT_MAX_BATCHED_TOKENS = 256
GPU_DEFAULT_MAX_BATCHED_TOKENS = 2048
DEFAULT_MAX_MODEL_LEN_CAP = 8192
BLOCK_SIZES = (8, 16, 32)


def kv_bytes_per_token(config: ModelConfig, bytes_per_elem: int = 4, tensor_parallel_size: int = 1) -> int:
    """Over all devices: under tp, KV heads fewer than the devices are held once per device."""
    kv_heads = effective_kv_heads(config.num_kv_heads, tensor_parallel_size)
    return config.num_layers * 2 * kv_heads * config.head_dim * bytes_per_elem


def kv_cache_num_blocks(config: ModelConfig, engine: EngineConfig, draft_config: ModelConfig | None = None,
                        pending_weight_bytes: int = 0) -> int:
    """Blocks in the pool (the null block included) from --pa-gpu-mem (MB), --pa-gpu-mem-usage
    (fraction) or --pa-ctxt-len (tokens). With a draft model both caches share the block
    tables: a token budget is kept (each cache gets that many tokens), a memory budget is
    split so both caches together stay within it."""
    import jax

    tp = engine.tensor_parallel_size
    per_token = kv_bytes_per_token(config, tensor_parallel_size=tp)
    per_block = per_token * engine.pa_blk_size
    if engine.pa_gpu_mem is not None:
        budget = engine.pa_gpu_mem * (1 << 20)
    elif engine.pa_gpu_mem_usage is not None:
        if not 0 < engine.pa_gpu_mem_usage <= 1:
            raise NotSupportedError(f"--pa-gpu-mem-usage must be in (0, 1], got {engine.pa_gpu_mem_usage}")
        device = jax.devices()[0]
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        total = (stats or {}).get("bytes_limit") or psutil.virtual_memory().total
        budget = engine.pa_gpu_mem_usage * total * (tp if stats else 1)  # per device: N of them under tp
    elif engine.pa_ctxt_len is not None:
        budget = engine.pa_ctxt_len * per_token
    elif jax.default_backend() == "cpu":
        budget = min(CPU_DEFAULT_KV_BYTES, psutil.virtual_memory().available // 8)
    else:
        stats = jax.devices()[0].memory_stats() or {}
        # Under -tp the weights wait in host memory (parallel.mesh.host_staging): each device will
        # still receive 1/tp of `pending_weight_bytes` before the cache is allocated.
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0) - pending_weight_bytes // tp
        budget = 0.8 * max(free, per_block * 64) * tp
    # +1: block 0 is the trash block padding tokens write into.
    num_blocks = max(2, int(budget // per_block)) + 1
    if draft_config is None or engine.pa_ctxt_len is not None:
        return num_blocks
    draft = kv_bytes_per_token(draft_config)
    return max(2, (num_blocks - 1) * per_token // (per_token + draft)) + 1


def _kv_cache(engine: EngineConfig, config: ModelConfig, num_blocks: int) -> tuple[KVCacheManager, int, int]:
    """(bookkeeping, blocks of the device pool, max_model_len)."""
    block_size, max_seqs = engine.pa_blk_size, engine.max_seqs
    default_cap = min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
    if engine.no_paged_attn:
        # One contiguous slot of max_model_len tokens per sequence (contiguous_cache.py).
        # Without an explicit max_model_len the KV budget is split between the max_seqs slots.
        slot_tokens = engine.max_model_len or min(default_cap, (num_blocks - 1) // max_seqs * block_size)
        if slot_tokens < 2:
            raise NotSupportedError(
                f"--no-paged-attn splits the KV cache into {max_seqs} slots, leaving each under 2 tokens: "
                f"lower --max-seqs or give the KV cache more memory")
        num_blocks, slot_blocks = contiguous_pool_layout(max_seqs, slot_tokens, block_size)
        return ContiguousBlockManager(max_seqs, slot_blocks, block_size), num_blocks, slot_tokens
    max_model_len = min(engine.max_model_len or default_cap, (num_blocks - 1) * block_size)
    kv = BlockManager(num_blocks, block_size, enable_prefix_caching=engine.prefix_cache_n > 0,
                      prefix_cache_n=engine.prefix_cache_n)
    return kv, num_blocks, max_model_len


def check_engine_config(engine: EngineConfig, speculative: bool = False) -> None:
    """Refuse settings no engine can run with, before anything is built or loaded."""
    if engine.pa_blk_size not in BLOCK_SIZES:
        raise NotSupportedError(f"--pa-blk-size must be 8, 16 or 32, got {engine.pa_blk_size}")
    if not isinstance(engine.max_seqs, int) or engine.max_seqs < 1:
        raise NotSupportedError(f"--max-seqs must be a positive integer, got {engine.max_seqs!r}")
    gamma = engine.speculative_gamma
    if speculative and (not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1):
        raise NotSupportedError(f"speculative_gamma (-g/--gamma) must be a positive integer, got {gamma!r}")
    if engine.tensor_parallel_size != 1:
        make_mesh(engine.tensor_parallel_size)  # a bad size or too few devices: TensorParallelError


def build_engine(engine: EngineConfig, target: "LoadedModel", draft: "LoadedModel | None" = None,
                 devices=None) -> Engine:
    """An engine serving `target` (speculating with `draft` when given), not yet started or
    warmed up (`Engine.warmup`). `devices`: the ones its mesh takes (a data-parallel replica's
    group, parallel/replicas.py); default the first -tp devices, or JAX's default device at -tp 1."""
    import jax

    check_engine_config(engine, speculative=draft is not None)
    config = target.config
    if draft is not None:
        check_draft_vocabulary(target, draft)
    pending = 0
    if engine.tensor_parallel_size > 1 and jax.default_backend() != "cpu":
        from ..memory import weight_bytes

        pending = weight_bytes(target.model) + (weight_bytes(draft.model) if draft is not None else 0)
    num_blocks = kv_cache_num_blocks(config, engine, draft.config if draft is not None else None, pending)
    kv, num_blocks, max_model_len = _kv_cache(engine, config, num_blocks)
    max_seqs = engine.max_seqs
    batched = engine.max_num_batched_tokens or (CPU_DEFAULT_MAX_BATCHED_TOKENS if jax.default_backend() == "cpu"
                                                else GPU_DEFAULT_MAX_BATCHED_TOKENS)
    batched = max(batched, max_seqs)
    gamma = engine.speculative_gamma if draft is not None else 0
    scheduler = Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=batched, max_model_len=max_model_len,
                          eos_token_ids=target.eos_token_ids, num_lookahead_tokens=gamma)
    # A verification step runs every scheduled token plus up to gamma draft tokens per sequence.
    mesh = make_mesh(engine.tensor_parallel_size, devices) if engine.tensor_parallel_size > 1 or devices else None
    if mesh is not None:
        log.info("tensor parallel over %d devices: %s", mesh.size, ", ".join(map(str, mesh.devices.flat)))
    runner = ModelRunner(target.model, config, num_blocks, engine.pa_blk_size, max_model_len, max_seqs,
                         batched + max_seqs * gamma, token_buckets=engine.token_buckets,
                         seq_buckets=engine.seq_buckets, input_embeds=target.vision is not None,
                         num_lookahead_tokens=gamma, mesh=mesh)
    log.info("KV cache: %d blocks of %d tokens (%.0f MiB), max model len %d, buckets tokens=%s seqs=%s",
             num_blocks - 1, engine.pa_blk_size, runner.kv_cache_bytes / 2**20, max_model_len,
             runner.token_buckets, runner.seq_buckets)
    proposer = None
    if draft is not None:
        draft_runner = ModelRunner(draft.model, draft.config, num_blocks, engine.pa_blk_size, max_model_len,
                                   runner.seq_buckets[-1], runner.token_buckets[-1],
                                   token_buckets=runner.token_buckets, seq_buckets=runner.seq_buckets,
                                   mesh=mesh)  # split over the same devices: its logits meet the target's
        log.info("speculative decoding: draft %s (%s, %d layers%s), gamma %d, draft KV cache %.0f MiB",
                 draft.name, draft.config.arch, draft.config.num_layers,
                 f", ISQ {draft.isq_type}" if draft.isq_type else "", gamma, draft_runner.kv_cache_bytes / 2**20)
        proposer = DraftProposer(draft_runner, gamma, config.vocab_size, runner.seq_buckets[-1])
    return Engine(runner, scheduler, target.tokenizer, config.vocab_size, proposer=proposer, config=engine)
