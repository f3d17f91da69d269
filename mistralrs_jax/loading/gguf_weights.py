"""A GGUF file seen as a `WeightSource`: Hugging Face tensor names, llama.cpp's file.

Builders ask for tensors by their HF name ("model.layers.3.self_attn.q_proj") in HF orientation
([out, in]). `GGUFWeights` translates each name to llama.cpp's ("blk.3.attn_q") through the
per-architecture bindings below and undoes what llama.cpp's converter changed: the Q/K row
permutation of the llama architecture and Gemma's folded norm offset. So every family has one
builder for both formats (the other format: loading/safetensors.py). `make_linear_factory`
decides how a GGUF projection is held; `build_model_from_gguf` puts the pieces together.
"""
from __future__ import annotations

import logging
from typing import Callable

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError, NotSupportedError
from ..models.layers import Embedding, Linear
from ..models.registry import build_model, check_gguf_architecture, resolve_dtype
from ..models.weights import WeightSource
from .gguf import check_tensor_shapes

log = logging.getLogger(__name__)


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


def gguf_module_name(module: str, arch: str) -> str | None:
    """llama.cpp's name of an HF module ("model.layers.3.self_attn.q_proj" -> "blk.3.attn_q"),
    or None when the `arch` architecture binds nothing to it."""
    if module in GGUF_GLOBAL_BINDINGS:
        return GGUF_GLOBAL_BINDINGS[module]
    if module.startswith("model.layers."):
        index, _, inner = module[len("model.layers."):].partition(".")
        bound = GGUF_LAYER_BINDINGS.get(arch, {}).get(inner)
        return f"blk.{index}.{bound}" if bound and index.isdigit() else None
    return None


class GGUFWeights(WeightSource):
    """A GGUF file seen through HF names. `make_linear(gguf, name, row_transform, bias)` decides how
    a projection is held (`make_linear_factory`: packed blocks, or dense f32)."""

    def __init__(self, gguf, config: ModelConfig, make_linear: Callable, dtype=None):
        self.gguf = gguf
        self.path = gguf.path
        self.config = config
        self.arch = config.arch
        self.make_linear = make_linear
        self.dtype = dtype or jnp.float32
        self.norm_offset_folded = self.arch in GGUF_FOLDED_NORM_OFFSET

    def gguf_name(self, name: str) -> str | None:
        """llama.cpp's name for an HF tensor name, or None when this architecture has no binding."""
        module, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            return gguf_module_name(name, self.arch)
        base = gguf_module_name(module, self.arch)
        return f"{base}.{suffix}" if base else None

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

    # Keep a quantized token table packed (set by build_model_from_gguf for cpu_weights="quantized").
    packed_embeddings = False

    def embedding(self, module: str) -> Embedding:
        from ..quant.packed import PACKED_TYPES, from_gguf

        name = self._name(module + ".weight")
        tensor = self.gguf.tensor(name)
        if self.packed_embeddings and tensor.qtype in PACKED_TYPES:
            return Embedding(packed=from_gguf(tensor.data, tensor.qtype, tensor.shape))
        return Embedding(self.gguf.dequantize(name), dtype=self.dtype)

    def experts(self, layer: int, which: str) -> np.ndarray:
        return self.gguf.dequantize(f"blk.{layer}.{GGUF_EXPERT_NAMES[which]}.weight")  # [E, out, in]

    def rope_freq_factors(self) -> dict[str, np.ndarray]:
        factors = {}
        for key, name in (("freqs", "rope_freqs.weight"), ("short", "rope_factors_short.weight"),
                          ("long", "rope_factors_long.weight")):
            if name in self.gguf:
                factors[key] = self.gguf.dequantize(name).reshape(-1)
        return factors


# --------------------------------------------------------------------------- building

def make_linear_factory(cpu_weights: str = "quantized", dtype=jnp.float32) -> Callable:
    """How a GGUF weight becomes a `Linear` (design rule 7).

    "quantized" (default): quantized tensors stay packed at the file's own bits per weight
    (`quant.gguf_projection`); float tensors are held dense in `dtype`. "f32": dequantize once
    at load, after checking the whole dequantized model fits in available memory. A
    `PackedWeight` given as the source (what ISQ builds) is held as is.
    """
    from ..memory import ensure_fits
    from ..quant.packed import CPU_WEIGHT_MODES, FLOAT_TYPES, PackedWeight, dequantized_bytes, gguf_projection

    if cpu_weights not in CPU_WEIGHT_MODES:
        raise NotSupportedError(f"cpu_weights must be one of {', '.join(CPU_WEIGHT_MODES)}, got {cpu_weights!r}")
    checked: set[int] = set()

    def make_linear(gguf, name: str, row_transform=None, bias: np.ndarray | None = None) -> Linear:
        if isinstance(gguf, PackedWeight):
            return Linear(packed=gguf.map_rows(row_transform), bias=bias)
        packed = gguf_projection(gguf, name, cpu_weights)
        if packed is not None:
            return Linear(packed=packed.map_rows(row_transform), bias=bias)
        if gguf.tensor(name).qtype not in FLOAT_TYPES and id(gguf) not in checked:
            checked.add(id(gguf))
            ensure_fits(dequantized_bytes(gguf), f"dequantizing {gguf.path} to f32",
                        "keep it quantized (--cpu-weights quantized, the default) or use a machine with more memory")
        weight = gguf.dequantize(name)  # [out, in]
        weight = row_transform(weight) if row_transform is not None else weight
        return Linear(np.ascontiguousarray(weight.T), bias=bias, dtype=dtype)

    return make_linear


def build_model_from_gguf(gguf, config: ModelConfig, cpu_weights: str = "quantized", dtype: str = "auto",
                          wrap_linear: Callable[[Callable], Callable] | None = None):
    """`wrap_linear(make_linear) -> make_linear`, when given, decides how projections are built
    from the default factory (LLM passes ISQ's `wrap_factory` here and keeps what it returns)."""
    check_gguf_architecture(gguf.path, config.arch)
    check_tensor_shapes(gguf, config)
    weight_dtype = resolve_dtype(dtype)
    make_linear = make_linear_factory(cpu_weights, weight_dtype)
    if wrap_linear is not None:
        make_linear = wrap_linear(make_linear)
    source = GGUFWeights(gguf, config, make_linear, weight_dtype)
    source.packed_embeddings = cpu_weights == "quantized"
    return build_model(config, source, weight_dtype)
