"""Model and engine configuration.

`ModelConfig` is built from a GGUF file's metadata or a Hugging Face `config.json`;
`EngineConfig` holds the scheduler / KV-cache settings (the mistralrs-server flags).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError


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
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # rotary dims (partial rotary); None -> head_dim
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict (llama3, linear, ...)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str) -> "ModelConfig":
        """`meta` maps GGUF keys to python values; `source` names the file in errors."""
        arch = meta.get("general.architecture")
        if not arch:
            raise ModelLoadError(f"{source}: GGUF metadata has no general.architecture key")

        def get(key: str, default: Any = KeyError):
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is KeyError:
                raise ModelLoadError(f"{source}: GGUF metadata is missing the required key {full!r}")
            return default

        hidden = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        num_kv = get("attention.head_count_kv", num_heads)
        if isinstance(num_kv, list):  # per-layer lists exist in some files; uniform here
            num_kv = max(num_kv)
        head_dim = int(get("attention.key_length", hidden // num_heads))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelLoadError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokens)")
            vocab = len(tokens)
        rope_scaling = None
        scaling_type = get("rope.scaling.type", None)
        if scaling_type and scaling_type != "none":
            rope_scaling = {
                "rope_type": scaling_type,
                "factor": float(get("rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(get("rope.scaling.original_context_length", 0) or 0),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            sliding_window=get("attention.sliding_window", None),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            name=str(meta.get("general.name", "")),
        )


@dataclass
class EngineConfig:
    """Scheduler and KV-cache settings; names follow the mistralrs-server flags."""

    max_seqs: int = 32
    max_num_batched_tokens: int | None = None  # None -> chosen per backend
    pa_blk_size: int = 16
    pa_ctxt_len: int | None = None  # max tokens per sequence; None -> model's context (capped)
    pa_gpu_mem: int | None = None  # MB for the KV cache
    pa_gpu_mem_usage: float | None = None  # fraction of device (or host) memory for the KV cache
    prefix_cache_n: int = 16
    no_paged_attn: bool = False
    cpu_weights: str = "f32"  # "f32" | "quantized"
    token_buckets: list[int] | None = None
    seq_buckets: list[int] | None = None
    warmup: bool = True
