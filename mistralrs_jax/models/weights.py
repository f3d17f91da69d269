"""Where a family builder gets its tensors: one interface, Hugging Face names, two file formats.

Builders ask for tensors by their Hugging Face name ("model.layers.3.self_attn.q_proj") in HF
orientation ([out, in] for projections). `SafetensorsWeights` (loading/safetensors.py) reads
them from an HF checkpoint; `GGUFWeights` (loading/gguf_weights.py) translates each name to
llama.cpp's and undoes what llama.cpp's converter changed. So every family has one builder for
both formats.
"""
from __future__ import annotations

import logging

import numpy as np

from ..config import ModelConfig
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

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name the source stores, as stored (vision builders search it for prefixes)."""
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
