"""Phi-2 (HF `PhiForCausalLM`): a parallel block with LayerNorm, partial rotary and biases.

One LayerNorm feeds both branches, whose outputs are added to the residual together:
x + attn(ln(x)) + mlp(ln(x)). Every projection has a bias, the MLP is fc1 -> GELU (tanh) -> fc2,
the output projection is called `dense`, rotary covers `partial_rotary_factor` of each head,
and the untied lm_head has a bias too. Optional per-head LayerNorms on q/k (`qk_layernorm`).
"""
from __future__ import annotations

from flax import nnx

from ..config import ModelConfig
from .layers import PlainMLP, RotaryEmbedding
from .transformer import Attention, CausalLM


class PhiDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, weights: dict, layer_index: int):
        self.input_layernorm = weights["input_layernorm"]
        self.self_attn = Attention(
            config, q_proj=weights.get("q_proj"), k_proj=weights.get("k_proj"), v_proj=weights.get("v_proj"),
            qkv_proj=weights.get("qkv_proj"), o_proj=weights["dense"], q_norm=weights.get("q_layernorm"),
            k_norm=weights.get("k_layernorm"), sliding_window=config.layer_sliding_window(layer_index))
        self.mlp = weights["mlp"]

    def __call__(self, x, meta, kv, rope, block_size):
        h = self.input_layernorm(x)
        attn_out, kv = self.self_attn(h, meta, kv, rope, block_size)
        return x + attn_out + self.mlp(h), kv


def build(config: ModelConfig, source, progress=None, dtype=None) -> CausalLM:
    eps = config.rms_norm_eps
    layers = []
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        attn = prefix + "self_attn."
        if source.has_module(attn + "qkv_proj"):
            weights = {"qkv_proj": source.linear(attn + "qkv_proj")}
        else:
            weights = {name: source.linear(attn + name) for name in ("q_proj", "k_proj", "v_proj")}
        weights["dense"] = source.linear(attn + "dense")
        if source.has_module(attn + "q_layernorm"):
            weights["q_layernorm"] = source.layer_norm(attn + "q_layernorm", eps)
            weights["k_layernorm"] = source.layer_norm(attn + "k_layernorm", eps)
        weights["mlp"] = PlainMLP(source.linear(prefix + "mlp.fc1"), source.linear(prefix + "mlp.fc2"),
                                  config.hidden_act)
        weights["input_layernorm"] = source.layer_norm(prefix + "input_layernorm", eps)
        layers.append(PhiDecoderLayer(config, weights, i))
        if progress is not None:
            progress(1)
    rope = RotaryEmbedding.from_config(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                       config.max_position_embeddings, source.rope_freq_factors())
    return CausalLM(config, source.embedding("model.embed_tokens"), layers,
                    source.layer_norm("model.final_layernorm", eps), source.lm_head(config), rope=rope)
