"""What every decoder-only family here shares: attention over the paged KV cache, and the outer model.

A family file (llama.py, gemma.py, phi2.py, ...) decides what a decoder layer looks like and
how its weights are named; the attention block and the embed -> layers -> norm -> logits
shell are the same code for all of them, configured by the few details families differ in
(fused QKV, q/k norms, attention scale, logit soft-capping, per-layer sliding windows,
local/global rotary bases, embedding scale).

Runner contract: `model(input_ids, meta, kv_caches, block_size)` returns (hidden after the
final norm, new caches) and `model.logits(hidden)` the f32 logits; every layer's cache has
the shape [num_blocks * block_size, config.num_kv_heads, config.head_dim].
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..parallel.shard_ops import attention_per_shard
from .layers import Embedding, Linear, RotaryEmbedding
from .lora_layers import adapter_scalings as lora_context


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, reading and writing the paged cache."""

    def __init__(self, config: ModelConfig, *, o_proj: Linear, q_proj: Linear | None = None,
                 k_proj: Linear | None = None, v_proj: Linear | None = None, qkv_proj: Linear | None = None,
                 q_norm: nnx.Module | None = None, k_norm: nnx.Module | None = None,
                 sliding_window: int | None = None):
        if qkv_proj is None and None in (q_proj, k_proj, v_proj):
            raise ValueError("Attention needs q_proj, k_proj and v_proj, or a fused qkv_proj")
        self.q_proj, self.k_proj, self.v_proj, self.qkv_proj, self.o_proj = q_proj, k_proj, v_proj, qkv_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm  # per-head norms before rotary (Gemma 3)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.soft_cap = config.attn_logit_softcapping
        self.sliding_window = sliding_window  # static per layer: one compiled mask per window size

    def __call__(self, x, meta, kv, rope: RotaryEmbedding, block_size: int):
        num_tokens = x.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            q, k, v = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size], qkv[:, q_size + kv_size:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, meta), rope(k, meta)
        out, kv = attention_per_shard(q, k, v, kv, meta, block_size=block_size, scale=self.scale,
                                      sliding_window=self.sliding_window, soft_cap=self.soft_cap)
        return self.o_proj(out.reshape(num_tokens, q_size)), kv


class CausalLM(nnx.Module):
    """embed -> decoder layers -> final norm; `logits` applies the head (tied or not) and any soft-cap.

    Each layer is called as `layer(x, meta, kv, rope, block_size)`; a layer whose
    `uses_local_rope` is true gets `local_rope` (Gemma 3's sliding layers use another base).
    """

    def __init__(self, config: ModelConfig, embed: Embedding, layers: list, norm: nnx.Module,
                 lm_head: Linear | None, *, rope: RotaryEmbedding | None = None,
                 local_rope: RotaryEmbedding | None = None, embed_scale: float | None = None):
        self.embed_tokens = embed
        self.layers = nnx.List(layers)
        self.norm = norm
        self.lm_head = lm_head  # None -> tied to the embedding table
        self.rope = rope or RotaryEmbedding.from_config(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                                        config.max_position_embeddings)
        self.local_rope = local_rope
        self.embed_scale = embed_scale
        self.final_logit_softcap = config.final_logit_softcapping

    def __call__(self, input_ids, meta, kv_caches: list, block_size: int, input_embeds=None, embeds_mask=None,
                 adapter_scalings=None):
        """Hidden states [T, hidden] after the final norm, and the updated per-layer caches.

        `input_embeds` [T, hidden] replaces the token embedding where `embeds_mask` [T] is set
        (a vision model's image features at its placeholder tokens). `adapter_scalings` mixes
        the unmerged adapters of the Linears holding a `LoraStack` (models/lora_layers.py):
        [T, n_adapters] for every layer, or [T, num_layers, n_adapters] per layer (X-LoRA)."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * jnp.float32(self.embed_scale)
        if input_embeds is not None:
            x = jnp.where(embeds_mask[:, None], input_embeds.astype(x.dtype), x)
        new_caches = []
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):  # unrolled: 2-3x faster than scan on XLA:CPU
            rope = self.local_rope if self.local_rope is not None and getattr(layer, "uses_local_rope", False) \
                else self.rope
            scalings = adapter_scalings
            if scalings is not None and scalings.ndim == 3:
                scalings = scalings[:, i, :]
            with lora_context(scalings):
                x, kv = layer(x, meta, kv, rope, block_size)
            new_caches.append(kv)
        return self.norm(x), new_caches

    def logits(self, hidden):
        logits = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        if self.final_logit_softcap is not None:
            logits = self.final_logit_softcap * jnp.tanh(logits / self.final_logit_softcap)
        return logits

