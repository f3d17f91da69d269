"""Where a family builder gets its tensors: one interface, Hugging Face names, two file formats.

Builders ask for tensors by their Hugging Face name ("model.layers.3.self_attn.q_proj") in HF
orientation ([out, in] for projections). `SafetensorsWeights` (loading/safetensors.py) reads
them from an HF checkpoint; `GGUFWeights` here translates each name to llama.cpp's
("blk.3.attn_q") through the per-architecture bindings below and undoes what llama.cpp's
converter changed: the Q/K row permutation of the llama architecture and Gemma's folded
norm offset. So every family has one builder for both formats.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError
from .layers import Embedding, LayerNorm, Linear, RMSNorm

log = logging.getLogger(__name__)


class WeightSource:
    """Tensors by HF name. Subclasses implement `has`, `array`, `linear`, `embedding`, `experts`."""

    path: str = ""
    norm_offset_folded = False  # the file stores Gemma norms as (1 + w) already

    def has(self, name: str) -> bool:
        """`name` is a full tensor name, ending in .weight or .bias."""
        raise NotImplementedError

    def array(self, name: str) -> np.ndarray:
        """A tensor as f32 numpy (norm weights, biases, routers)."""
        raise NotImplementedError

    def linear(self, module: str) -> Linear:
        """The projection `module` (its .weight and, when present, .bias)."""
        raise NotImplementedError

    def embedding(self, module: str) -> Embedding:
        raise NotImplementedError

    def experts(self, layer: int, which: str) -> np.ndarray:
        """Stacked expert weights [experts, out, in] of one MoE layer; which: gate | up | down."""
        raise NotImplementedError

    def rope_freq_factors(self) -> dict[str, np.ndarray]:
        """GGUF's precomputed rotary divisors ("freqs", "short", "long"); none in HF checkpoints."""
        return {}

    def has_module(self, module: str) -> bool:
        return self.has(module + ".weight")

    def rms_norm(self, module: str, eps: float, offset: float = 0.0) -> RMSNorm:
        """`offset` is what the model adds to the stored weight (Gemma: 1)."""
        return RMSNorm(self.array(module + ".weight"), eps, offset=0.0 if self.norm_offset_folded else offset)

    def layer_norm(self, module: str, eps: float) -> LayerNorm:
        bias = self.array(module + ".bias") if self.has(module + ".bias") else None
        return LayerNorm(self.array(module + ".weight"), bias, eps)

    def lm_head(self, config: ModelConfig) -> Linear | None:
        """The output projection, or None when it is tied to the embedding table."""
        if config.tie_word_embeddings or not self.has_module("lm_head"):
            return None
        return self.linear("lm_head")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (ggml interleaved rotary -> HF rotate-halves).

    w: [out, ...] with out = n_heads * head_dim. Within each head the converter ordered rows
    as (pair, 2) from (2, half); reverse it. Works on weights, biases and per-row block scales.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- GGUF bindings
#
# HF module name (inside "model.layers.N.") -> llama.cpp tensor name (inside "blk.N."), per
# GGUF architecture. Every llama.cpp name here is checked against gguf.constants.MODEL_TENSORS
# by tests/test_families.py.

_ATTENTION = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv"}
_GATED_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_PRE_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GEMMA2_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}

GGUF_LAYER_BINDINGS: dict[str, dict[str, str]] = {
    "llama": {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS, "block_sparse_moe.gate": "ffn_gate_inp"},
    "qwen2": {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
    "phi3": {**_ATTENTION, **_PRE_NORMS, "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "gemma": {**_ATTENTION, **_GATED_MLP, **_PRE_NORMS},
    "gemma2": {**_ATTENTION, **_GATED_MLP, **_GEMMA2_NORMS},
    "gemma3": {**_ATTENTION, **_GATED_MLP, **_GEMMA2_NORMS,
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "phi2": {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.qkv_proj": "attn_qkv", "self_attn.dense": "attn_output", "input_layernorm": "attn_norm",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"},
    "starcoder2": {**_ATTENTION, **_PRE_NORMS, "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
}
GGUF_GLOBAL_BINDINGS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                        "model.final_layernorm": "output_norm", "lm_head": "output"}
# Stacked MoE experts (llama.cpp merges the per-expert HF tensors into one 3-D tensor).
GGUF_EXPERT_NAMES = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
# Architectures whose converter permutes Q/K rows for ggml's interleaved rotary.
GGUF_PERMUTED_QK = {"llama"}
# Architectures whose converter stores Gemma's RMSNorm weights as (1 + w).
GGUF_FOLDED_NORM_OFFSET = {"gemma", "gemma2", "gemma3"}


class GGUFWeights(WeightSource):
    """A GGUF file seen through HF names. `make_linear(gguf, name, row_transform, bias)` decides how
    a projection is held (registry.make_linear_factory: dense f32, or int8 blocks)."""

    def __init__(self, gguf, config: ModelConfig, make_linear: Callable, dtype=None):
        import jax.numpy as jnp

        self.gguf = gguf
        self.path = gguf.path
        self.config = config
        self.arch = config.arch
        self.make_linear = make_linear
        self.dtype = dtype or jnp.float32
        self.bindings = GGUF_LAYER_BINDINGS[self.arch]
        self.norm_offset_folded = self.arch in GGUF_FOLDED_NORM_OFFSET

    def gguf_name(self, name: str) -> str | None:
        """llama.cpp's name for an HF tensor name, or None when this architecture has no binding."""
        module, dot, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            module, suffix = name, ""
        if module in GGUF_GLOBAL_BINDINGS:
            base = GGUF_GLOBAL_BINDINGS[module]
        elif module.startswith("model.layers."):
            index, _, inner = module[len("model.layers."):].partition(".")
            if inner not in self.bindings:
                return None
            base = f"blk.{index}.{self.bindings[inner]}"
        else:
            return None
        return f"{base}.{suffix}" if suffix else base

    def _name(self, name: str) -> str:
        gguf_name = self.gguf_name(name)
        if gguf_name is None:
            raise ModelLoadError(f"{self.path}: no llama.cpp tensor name is bound to {name!r} for the "
                                 f"{self.arch} architecture")
        return gguf_name

    def has(self, name: str) -> bool:
        gguf_name = self.gguf_name(name)
        return gguf_name is not None and gguf_name in self.gguf

    def array(self, name: str) -> np.ndarray:
        return self.gguf.dequantize(self._name(name))

    def _row_transform(self, gguf_module: str):
        """Undo the converter's Q/K permutation (also inside a fused QKV tensor)."""
        if self.arch not in GGUF_PERMUTED_QK:
            return None
        cfg = self.config
        if gguf_module.endswith(".attn_q"):
            return lambda w: unpermute_rope_rows(w, cfg.num_heads)
        if gguf_module.endswith(".attn_k"):
            return lambda w: unpermute_rope_rows(w, cfg.num_kv_heads)
        if gguf_module.endswith(".attn_qkv"):
            q_rows = cfg.num_heads * cfg.head_dim
            k_rows = cfg.num_kv_heads * cfg.head_dim

            def fused(w):
                q, k, v = w[:q_rows], w[q_rows:q_rows + k_rows], w[q_rows + k_rows:]
                return np.concatenate([unpermute_rope_rows(q, cfg.num_heads),
                                       unpermute_rope_rows(k, cfg.num_kv_heads), v])
            return fused
        return None

    def linear(self, module: str) -> Linear:
        gguf_module = self._name(module)
        transform = self._row_transform(gguf_module)
        bias = None
        if gguf_module + ".bias" in self.gguf:
            bias = self.gguf.dequantize(gguf_module + ".bias")
            bias = transform(bias) if transform else bias
        return self.make_linear(self.gguf, gguf_module + ".weight", transform, bias=bias)

    def embedding(self, module: str) -> Embedding:
        return Embedding(self.gguf.dequantize(self._name(module + ".weight")), dtype=self.dtype)

    def experts(self, layer: int, which: str) -> np.ndarray:
        return self.gguf.dequantize(f"blk.{layer}.{GGUF_EXPERT_NAMES[which]}.weight")  # [E, out, in]

    def rope_freq_factors(self) -> dict[str, np.ndarray]:
        factors = {}
        for key, name in (("freqs", "rope_freqs.weight"), ("short", "rope_factors_short.weight"),
                          ("long", "rope_factors_long.weight")):
            if name in self.gguf:
                factors[key] = self.gguf.dequantize(name).reshape(-1)
        return factors
