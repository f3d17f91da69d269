"""Gemma 1, 2 and 3: one decoder layer with a variant flag per generation.

What all three share: the embedding is scaled by sqrt(hidden); RMSNorm multiplies by (1 + w)
(checkpoints store w; llama.cpp's converter stores 1 + w, see weights.py); the MLP is GeGLU
with tanh-approximated GELU; the head is tied to the embedding.
Gemma 2 adds "sandwich" norms (after attention and around the MLP), attention and final logit
soft-capping, `query_pre_attn_scalar` as the attention scale, and sliding-window attention on
alternate layers. Gemma 3 drops attention soft-capping, adds RMSNorm on each head's query and
key, and gives its sliding layers their own rotary base (`rope_local_theta`).
"""
from __future__ import annotations

import math

from flax import nnx

from ..config import ModelConfig
from .layers import GatedMLP, RotaryEmbedding
from .llama import attention_weights
from .transformer import Attention, CausalLM

NORM_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + w)


class GemmaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, weights: dict, layer_index: int, sandwich: bool):
        window = config.layer_sliding_window(layer_index)
        self.input_layernorm = weights["input_layernorm"]
        self.self_attn = Attention(
            config, q_proj=weights.get("q_proj"), k_proj=weights.get("k_proj"), v_proj=weights.get("v_proj"),
            qkv_proj=weights.get("qkv_proj"), o_proj=weights["o_proj"], q_norm=weights.get("q_norm"),
            k_norm=weights.get("k_norm"), sliding_window=window)
        self.mlp = weights["mlp"]
        self.sandwich = sandwich
        # Gemma 1: post_attention_layernorm is the norm before the MLP. Gemma 2/3: it normalises
        # the attention output, and the MLP has its own pre and post norms.
        self.post_attention_layernorm = weights["post_attention_layernorm"]
        self.pre_feedforward_layernorm = weights.get("pre_feedforward_layernorm")
        self.post_feedforward_layernorm = weights.get("post_feedforward_layernorm")
        self.uses_local_rope = window is not None and config.rope_local_theta is not None

    def __call__(self, x, meta, kv, rope, block_size):
        attn_out, kv = self.self_attn(self.input_layernorm(x), meta, kv, rope, block_size)
        if not self.sandwich:
            x = x + attn_out
            return x + self.mlp(self.post_attention_layernorm(x)), kv
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, kv


def build(config: ModelConfig, source, progress=None, dtype=None) -> CausalLM:
    sandwich = config.arch in ("gemma2", "gemma3")
    qk_norm = config.arch == "gemma3"
    eps = config.rms_norm_eps
    layers = []
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        weights = attention_weights(source, prefix)
        weights["mlp"] = GatedMLP(source.linear(prefix + "mlp.down_proj"), config.hidden_act,
                                  gate=source.linear(prefix + "mlp.gate_proj"),
                                  up=source.linear(prefix + "mlp.up_proj"))
        norms = ["input_layernorm", "post_attention_layernorm"]
        if sandwich:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in norms:
            weights[name] = source.rms_norm(prefix + name, eps, offset=NORM_OFFSET)
        if qk_norm:
            weights["q_norm"] = source.rms_norm(prefix + "self_attn.q_norm", eps, offset=NORM_OFFSET)
            weights["k_norm"] = source.rms_norm(prefix + "self_attn.k_norm", eps, offset=NORM_OFFSET)
        layers.append(GemmaDecoderLayer(config, weights, i, sandwich))
        if progress is not None:
            progress(1)
    rope = RotaryEmbedding.from_config(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                       config.max_position_embeddings, source.rope_freq_factors())
    local_rope = None
    if config.rope_local_theta is not None and config.rope_local_theta != config.rope_theta:
        # Scaling (Gemma 3's linear factor) applies to the global layers only.
        local_rope = RotaryEmbedding.from_config(config.rotary_dim, config.rope_local_theta, None,
                                                 config.max_position_embeddings)
    return CausalLM(config, source.embedding("model.embed_tokens"), layers,
                    source.rms_norm("model.norm", eps, offset=NORM_OFFSET), source.lm_head(config), rope=rope,
                    local_rope=local_rope, embed_scale=math.sqrt(config.hidden_size))
