"""The llama architecture and the families that differ from it by details.

Served here: Llama 2/3 (rope scaling), Mistral (sliding window), Mixtral (sparse MoE MLP, see
mixtral.py), Qwen2/2.5 (QKV biases: any projection with a bias tensor gets one), Phi-3/3.5
(fused qkv_proj and gate_up_proj, LongRoPE) and Starcoder2 (LayerNorm and a plain GELU MLP,
built in starcoder2.py from this layer). Weights follow the Hugging Face layout; GGUF files
reach the same builder through loading/gguf_weights.py. Every family returns the shared
transformer.CausalLM shell (embed -> layers -> norm -> logits) around its own layers.
"""
from __future__ import annotations

import logging

import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .layers import GatedMLP, RotaryEmbedding
from .transformer import Attention, CausalLM

log = logging.getLogger(__name__)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    `weights` holds the modules by HF name: q_proj/k_proj/v_proj (or qkv_proj), o_proj;
    gate_proj/up_proj (or gate_up_proj) and down_proj, or a ready `mlp` module (MoE, plain MLP);
    input_layernorm and post_attention_layernorm (RMSNorm or LayerNorm).
    """

    def __init__(self, config: ModelConfig, weights: dict, layer_index: int = 0):
        self.input_layernorm = weights["input_layernorm"]
        self.post_attention_layernorm = weights["post_attention_layernorm"]
        self.self_attn = Attention(
            config, q_proj=weights.get("q_proj"), k_proj=weights.get("k_proj"), v_proj=weights.get("v_proj"),
            qkv_proj=weights.get("qkv_proj"), o_proj=weights["o_proj"],
            sliding_window=config.layer_sliding_window(layer_index))
        if "mlp" in weights:
            self.mlp = weights["mlp"]
        else:
            self.mlp = GatedMLP(weights["down_proj"], config.hidden_act, gate=weights.get("gate_proj"),
                                up=weights.get("up_proj"), gate_up=weights.get("gate_up_proj"))

    def __call__(self, x, meta, kv, rope, block_size):
        attn_out, kv = self.self_attn(self.input_layernorm(x), meta, kv, rope, block_size)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


def attention_weights(source, prefix: str) -> dict:
    """q/k/v/o projections of one layer, fused (Phi-3) or not; biases come with them when present."""
    if source.has_module(prefix + "self_attn.qkv_proj"):
        weights = {"qkv_proj": source.linear(prefix + "self_attn.qkv_proj")}
    else:
        weights = {name: source.linear(prefix + "self_attn." + name) for name in ("q_proj", "k_proj", "v_proj")}
    weights["o_proj"] = source.linear(prefix + "self_attn.o_proj")
    return weights


def build(config: ModelConfig, source, progress=None, dtype=None) -> CausalLM:
    """Llama, Mistral, Mixtral, Qwen2 and Phi-3 from a WeightSource (models/weights.py)."""
    from .mixtral import build_moe

    layers = []
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        weights = attention_weights(source, prefix)
        if config.num_experts:
            weights["mlp"] = build_moe(source, config, i, dtype or jnp.float32)
        elif source.has_module(prefix + "mlp.gate_up_proj"):
            weights["gate_up_proj"] = source.linear(prefix + "mlp.gate_up_proj")
            weights["down_proj"] = source.linear(prefix + "mlp.down_proj")
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                weights[name] = source.linear(prefix + "mlp." + name)
        weights["input_layernorm"] = source.rms_norm(prefix + "input_layernorm", config.rms_norm_eps)
        weights["post_attention_layernorm"] = source.rms_norm(prefix + "post_attention_layernorm", config.rms_norm_eps)
        layers.append(LlamaDecoderLayer(config, weights, layer_index=i))
        if progress is not None:
            progress(1)
    rope = RotaryEmbedding.from_config(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                       config.max_position_embeddings, source.rope_freq_factors())
    return CausalLM(config, source.embedding("model.embed_tokens"), layers,
                            source.rms_norm("model.norm", config.rms_norm_eps), source.lm_head(config), rope=rope)
