"""Model and engine configuration: plain values, no behaviour that needs another module.

`ModelConfig` describes a decoder (models/model_config.py builds one from a GGUF file's
metadata or a Hugging Face `config.json`); `EngineConfig` holds the scheduler / KV-cache
settings (the mistralrs-server flags). This module imports nothing else of the package.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    arch: str  # family key in models/registry.py, e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5  # epsilon of the family's norm (RMSNorm, or LayerNorm for Phi-2/Starcoder2)
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # rotary dims (partial rotary); None -> head_dim
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict (llama3, linear, yarn, longrope)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # A window every layer uses. The runner skips key chunks outside it, so a model whose
    # layers differ (Gemma 2/3) leaves this None and lists them in `layer_sliding_windows`.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    hidden_act: str = "silu"  # HF activation name (layers.ACTIVATIONS)
    layer_sliding_windows: list[int | None] | None = None  # per layer; None -> `sliding_window` everywhere
    rope_local_theta: float | None = None  # rope base of the sliding-window layers (Gemma 3)
    attn_logit_softcapping: float | None = None  # Gemma 2
    final_logit_softcapping: float | None = None  # Gemma 2
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (Gemma 2/3); None -> head_dim
    num_experts: int = 0  # sparse MoE (Mixtral): experts per layer, 0 -> dense MLP
    num_experts_per_tok: int = 0
    dtype: str = "float32"  # the checkpoint's storage dtype (HF `torch_dtype`), for --dtype auto

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def layer_sliding_window(self, layer: int) -> int | None:
        if self.layer_sliding_windows is not None:
            return self.layer_sliding_windows[layer]
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Sequences in flight at most (mistral.rs' --max-seqs default): the one default, for the
# CLI and the Python API alike.
DEFAULT_MAX_SEQS = 16
# Draft tokens per speculative step (-g/--gamma); see engine/speculative.py for why so few.
DEFAULT_SPECULATIVE_GAMMA = 4


@dataclass
class EngineConfig:
    """Scheduler, KV-cache and speculation settings; names follow the mistralrs-server flags.
    `engine.factory.build_engine` turns them into an engine."""

    max_seqs: int = DEFAULT_MAX_SEQS
    max_num_batched_tokens: int | None = None  # None -> chosen per backend
    max_model_len: int | None = None  # None -> the model's context, capped (and never past the KV pool)
    pa_blk_size: int = 16  # tokens per KV block: 8, 16 or 32
    pa_ctxt_len: int | None = None  # KV cache budget in tokens (per model under speculation)
    pa_gpu_mem: int | None = None  # MB for the KV cache
    pa_gpu_mem_usage: float | None = None  # fraction of device (or host) memory for the KV cache
    prefix_cache_n: int = 16  # released sequences whose blocks stay cached; 0 disables prefix caching
    no_paged_attn: bool = False  # one contiguous slot per sequence instead of paged blocks
    token_buckets: list[int] | None = None  # padded step sizes (tokens); None -> the runner's defaults
    seq_buckets: list[int] | None = None  # padded step sizes (sequences)
    speculative_gamma: int = DEFAULT_SPECULATIVE_GAMMA  # draft tokens per step, when a draft model is given
    tensor_parallel_size: int = 1  # devices the model is split over (-tp; mistralrs_jax/parallel)
    # True: compile every step shape before serving; "background": compile the smallest ones, serve
    # at once within them, compile the rest on a thread (the server's start); False: compile lazily.
    warmup: bool | str = True
