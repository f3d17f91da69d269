"""Starcoder2: the llama block with LayerNorm (weight and bias), biases on every projection and a
plain GELU MLP (c_fc -> gelu_pytorch_tanh -> c_proj) instead of SwiGLU; usually a tied head and
a sliding window on every layer."""
from __future__ import annotations

from ..config import ModelConfig
from .layers import PlainMLP, RotaryEmbedding
from .llama import LlamaDecoderLayer, attention_weights
from .transformer import CausalLM


def build(config: ModelConfig, source, progress=None, dtype=None) -> CausalLM:
    eps = config.rms_norm_eps
    layers = []
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        weights = attention_weights(source, prefix)
        weights["mlp"] = PlainMLP(source.linear(prefix + "mlp.c_fc"), source.linear(prefix + "mlp.c_proj"),
                                  config.hidden_act)
        weights["input_layernorm"] = source.layer_norm(prefix + "input_layernorm", eps)
        weights["post_attention_layernorm"] = source.layer_norm(prefix + "post_attention_layernorm", eps)
        layers.append(LlamaDecoderLayer(config, weights, layer_index=i))
        if progress is not None:
            progress(1)
    rope = RotaryEmbedding.from_config(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                       config.max_position_embeddings, source.rope_freq_factors())
    return CausalLM(config, source.embedding("model.embed_tokens"), layers,
                            source.layer_norm("model.norm", eps), source.lm_head(config), rope=rope)
