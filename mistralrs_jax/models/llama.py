"""The llama architecture (Llama 2/3, SmolLM, and the families that differ from it by details).

Weights follow the Hugging Face layout (Q/K rows in "rotate halves" order). GGUF files store
llama Q/K rows permuted for ggml's interleaved rotary; the GGUF binding undoes that at load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.paged_attention import paged_attention, write_kv

from ..config import ModelConfig
from .layers import Embedding, Linear, RMSNorm, apply_rope, rope_inv_freq

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclass
class AttentionMetadata:
    """Per-step arrays describing the ragged batch (built by the runner on the host).

    Decode tokens (one per sequence) come first in the token axis; see
    pallas_kernels/paged_attention.py for how the two groups are attended.
    """

    positions: jax.Array  # [T] absolute position of each token
    slot_mapping: jax.Array  # [T] flat KV-cache slot each token's K/V is written to
    token_seq: jax.Array  # [T] sequence row of each token
    block_tables: jax.Array  # [S, max_blocks]
    num_decode_tokens: jax.Array  # scalar: tokens [0, n) are one-token decodes
    num_decode_chunks: jax.Array  # scalar: loop bound of the decode path
    chunk_seq: jax.Array  # [C] sequence row of each prefill key chunk
    chunk_start: jax.Array  # [C] first key position of each prefill key chunk
    num_prefill_chunks: jax.Array  # scalar: chunks in use


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Linear]):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            weights["q_proj"], weights["k_proj"], weights["v_proj"], weights["o_proj"],
        )
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.sliding_window = config.sliding_window
        self.scale = config.head_dim ** -0.5

    def __call__(self, x, meta: AttentionMetadata, kv, inv_freq, block_size: int):
        num_tokens = x.shape[0]
        q = self.q_proj(x).reshape(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, meta.positions, inv_freq, self.rotary_dim)
        k = apply_rope(k, meta.positions, inv_freq, self.rotary_dim)
        k_cache, v_cache = write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, block_size=block_size, scale=self.scale,
                              sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim)), (k_cache, v_cache)


class LlamaMLP(nnx.Module):
    def __init__(self, weights: dict[str, Linear]):
        self.gate_proj, self.up_proj, self.down_proj = weights["gate_proj"], weights["up_proj"], weights["down_proj"]

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, weights: dict):
        self.input_layernorm = weights["input_layernorm"]
        self.post_attention_layernorm = weights["post_attention_layernorm"]
        self.self_attn = LlamaAttention(config, weights)
        self.mlp = LlamaMLP(weights)

    def __call__(self, x, meta, kv, inv_freq, block_size):
        attn_out, kv = self.self_attn(self.input_layernorm(x), meta, kv, inv_freq, block_size)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, embed: Embedding, layers: list[LlamaDecoderLayer], norm: RMSNorm,
                 lm_head: Linear | None):
        self.embed_tokens = embed
        self.layers = nnx.List(layers)
        self.norm = norm
        self.lm_head = lm_head  # None -> tied to the embedding table
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config.rotary_dim, config.rope_theta, config.rope_scaling)))

    def __call__(self, input_ids, meta: AttentionMetadata, kv_caches: list, block_size: int):
        """Hidden states [T, hidden] after the final norm, and the updated per-layer caches."""
        x = self.embed_tokens(input_ids)
        inv_freq = self.inv_freq[...]
        new_caches = []
        for layer, kv in zip(self.layers, kv_caches):  # unrolled: 2-3x faster than scan on XLA:CPU
            x, kv = layer(x, meta, kv, inv_freq, block_size)
            new_caches.append(kv)
        return self.norm(x), new_caches

    def logits(self, hidden):
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the converter's Q/K row permutation (ggml interleaved rotary -> HF rotate-halves).

    w: [out, in] with out = n_heads * head_dim. Within each head the converter ordered rows
    as (pair, 2) from (2, half); reverse it.
    """
    out_f = w.shape[0]
    head_dim = out_f // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor names -> HF-layout module names, for one decoder layer.
GGUF_LAYER_NAMES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}


def build_from_gguf(gguf, config: ModelConfig, make_linear: Callable, progress=None) -> LlamaForCausalLM:
    """Build the model from a GGUFFile. `make_linear(gguf, tensor_name, row_transform)` returns a Linear."""
    layers = []
    for i in range(config.num_layers):
        prefix = f"blk.{i}."
        weights = {}
        for gguf_name, hf_name in GGUF_LAYER_NAMES.items():
            transform = None
            if gguf_name == "attn_q":
                transform = lambda w: _unpermute_rope_rows(w, config.num_heads)
            elif gguf_name == "attn_k":
                transform = lambda w: _unpermute_rope_rows(w, config.num_kv_heads)
            weights[hf_name] = make_linear(gguf, prefix + gguf_name + ".weight", transform)
        weights["input_layernorm"] = RMSNorm(gguf.dequantize(prefix + "attn_norm.weight"), config.rms_norm_eps)
        weights["post_attention_layernorm"] = RMSNorm(gguf.dequantize(prefix + "ffn_norm.weight"), config.rms_norm_eps)
        layers.append(LlamaDecoderLayer(config, weights))
        if progress is not None:
            progress(1)
    embed = Embedding(gguf.dequantize("token_embd.weight"))
    norm = RMSNorm(gguf.dequantize("output_norm.weight"), config.rms_norm_eps)
    lm_head = make_linear(gguf, "output.weight", None) if "output.weight" in gguf else None
    return LlamaForCausalLM(config, embed, layers, norm, lm_head)
