"""`ModelConfig` from a GGUF file's metadata or a Hugging Face `config.json`.

Both readers end in the same family keys (models/registry.py) and the same fields, so a
builder never asks which format its config came from. `source` names the file in every error.
"""
from __future__ import annotations

import math
import os
from typing import Any

from ..config import ModelConfig
from ..json_files import read_json_object
from ..errors import CorruptModelFileError, ModelLoadError, NotSupportedError
from .registry import (GGUF_ACTIVATIONS, HF_DEFAULT_ROPE_THETA, HF_TIED_BY_DEFAULT, check_gguf_architecture,
                       family_of_hf_config)


def config_from_gguf(meta: dict[str, Any], source: str) -> ModelConfig:
    try:
        return _config_from_gguf(meta, source)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise CorruptModelFileError(f"{source}: a GGUF hyperparameter has an unusable value ({exc}); the file is "
                                    "corrupt") from exc


def _config_from_gguf(meta: dict[str, Any], source: str) -> ModelConfig:
    """`meta` maps GGUF keys to python values; `source` names the file in errors.

    Values llama.cpp hard-codes per architecture instead of storing (Gemma's sliding
    window pattern and attention scale, the activation) follow llama.cpp's choices.
    """
    arch = meta.get("general.architecture")
    if not arch:
        raise ModelLoadError(f"{source}: GGUF metadata has no general.architecture key")
    check_gguf_architecture(source, arch)  # before any key it might lack: the architecture is the news

    def get(key: str, default: Any = KeyError):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ModelLoadError(f"{source}: GGUF metadata is missing the required key {full!r}")
        return default

    def count(key: str, default: Any = KeyError) -> int:
        return _whole(get(key, default), f"{arch}.{key}", source)

    hidden = count("embedding_length")
    num_heads = count("attention.head_count")
    num_layers = count("block_count")
    _check_sizes(source, hidden_size=hidden, num_heads=num_heads, num_layers=num_layers)
    num_kv = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv, list) and num_kv:  # per-layer lists exist in some files; uniform here
        num_kv = max(num_kv)
    num_kv = _whole(num_kv, f"{arch}.attention.head_count_kv", source)
    head_dim = count("attention.key_length", hidden // num_heads)
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokens)")
        vocab = len(tokens)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    windows = _gguf_layer_windows(arch, num_layers, get)
    uniform = len(set(windows)) == 1
    rope_theta = float(get("rope.freq_base", 10000.0))
    local_theta = None
    if arch == "gemma3" and any(w is not None for w in windows):
        local_theta = float(get("rope.freq_base_swa", 10000.0))
    elif arch == "gemma2":
        local_theta = float(get("rope.freq_base_swa", rope_theta))
    query_pre_attn_scalar = None
    if arch in ("gemma2", "gemma3"):
        # llama.cpp: the 27B models scale by hidden/heads, every other size by head_dim.
        is_27b = num_layers == (46 if arch == "gemma2" else 62)
        query_pre_attn_scalar = float(hidden // num_heads) if is_27b else float(head_dim)
    return checked_config(ModelConfig(
        arch=arch,
        vocab_size=_whole(vocab, "the vocabulary size", source),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(num_kv),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", get("attention.layer_norm_epsilon", 1e-5))),
        rope_theta=rope_theta,
        rope_dim=int(get("rope.dimension_count", head_dim)),
        rope_scaling=_gguf_rope_scaling(arch, get),
        max_position_embeddings=int(get("context_length", 4096)),
        sliding_window=windows[0] if uniform else None,
        layer_sliding_windows=None if uniform else windows,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        name=str(meta.get("general.name", "")),
        hidden_act=GGUF_ACTIVATIONS.get(arch, "silu"),
        rope_local_theta=local_theta,
        attn_logit_softcapping=float(get("attn_logit_softcapping", 0.0)) or None,
        final_logit_softcapping=float(get("final_logit_softcapping", 0.0)) or None,
        query_pre_attn_scalar=query_pre_attn_scalar,
        num_experts=int(get("expert_count", 0)),
        num_experts_per_tok=int(get("expert_used_count", 0)),
    ), source)

def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """A Hugging Face `config.json` (already parsed). `source` names the file in errors.

    Reads both the transformers 4 spelling (`rope_theta`, `rope_scaling`) and the 5 one
    (`rope_parameters`, per layer type when local and global layers differ). A vision-language
    config contributes its `text_config` only.
    """
    cfg = dict(hf)
    if isinstance(hf.get("text_config"), dict):
        cfg = {**hf["text_config"], "architectures": hf.get("architectures"),
               "model_type": hf["text_config"].get("model_type") or hf.get("model_type")}
    family = family_of_hf_config(cfg, source)
    model_type = str(cfg.get("model_type") or "")

    def required(key: str, *aliases: str) -> Any:
        for name in (key, *aliases):
            if cfg.get(name) is not None:
                return cfg[name]
        raise CorruptModelFileError(
            f"{source} has no {key!r}, which a {model_type or family} model needs; the file is incomplete: "
            "download config.json again or add the key")

    hidden = _whole(required("hidden_size", "n_embd"), "hidden_size", source)
    num_layers = _whole(required("num_hidden_layers", "n_layer"), "num_hidden_layers", source)
    num_heads = _whole(required("num_attention_heads", "n_head"), "num_attention_heads", source)
    _check_sizes(source, hidden_size=hidden, num_heads=num_heads, num_layers=num_layers)
    vocab = int(required("vocab_size"))
    intermediate = int(required("intermediate_size", "n_inner"))
    num_kv = int(cfg.get("num_key_value_heads") or num_heads)
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    max_positions = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 4096)

    rope = _hf_rope(cfg, family, head_dim, max_positions, source)
    windows = _hf_layer_windows(cfg, family, num_layers)
    uniform = len(set(windows)) == 1
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if family.startswith("gemma") and act == "gelu":
        act = "gelu_pytorch_tanh"  # Gemma's "gelu" always meant the tanh approximation (HF rewrites it too)
    eps = next((cfg[k] for k in ("rms_norm_eps", "layer_norm_eps", "norm_epsilon", "layer_norm_epsilon")
                if cfg.get(k) is not None), 1e-6 if family.startswith("gemma") else 1e-5)
    eos = cfg.get("eos_token_id")
    eos_ids = [int(e) for e in eos] if isinstance(eos, list) else [int(eos)] if isinstance(eos, int) else []
    query_pre_attn_scalar = None
    if family in ("gemma2", "gemma3"):
        query_pre_attn_scalar = float(cfg.get("query_pre_attn_scalar") or 256)
    return checked_config(ModelConfig(
        arch=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=rope["theta"],
        rope_dim=rope["dim"],
        rope_scaling=rope["scaling"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family in HF_TIED_BY_DEFAULT)),
        sliding_window=windows[0] if uniform else None,
        layer_sliding_windows=None if uniform else windows,
        bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids,
        name=model_type,
        hidden_act=str(act),
        rope_local_theta=rope["local_theta"],
        attn_logit_softcapping=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping") if family in ("gemma2", "gemma3") else None,
        query_pre_attn_scalar=query_pre_attn_scalar,
        num_experts=int(cfg.get("num_local_experts") or 0),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if cfg.get("num_local_experts") else 0,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    ), source)


# Bounds that no real model reaches; a value past one is a corrupt file, refused before anything is
# allocated from it (a 2^32-layer list, a 2^31-wide rotary table).
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # hidden, intermediate and head sizes
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 28


def _whole(value: Any, what: str, source: str) -> int:
    """`value` as an int, refusing NaN, fractions, strings and lists (a corrupt file's hyperparameter)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value:
        raise CorruptModelFileError(f"{source}: {what} is {value!r}, not a whole number; the file is corrupt")
    return int(value)


def _check_sizes(source: str, **sizes: int) -> None:
    limits = {"num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS, "vocab_size": MAX_VOCAB,
              "max_position_embeddings": MAX_CONTEXT}
    for name, value in sizes.items():
        limit = limits.get(name, MAX_WIDTH)
        if not 0 < value <= limit:
            raise CorruptModelFileError(
                f"{source}: {name} = {value} is outside 1..{limit}; the model file is corrupt")


def _check_positive(source: str, **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CorruptModelFileError(f"{source}: {name} = {value} must be a finite number above 0; the model "
                                        "file is corrupt")


def checked_config(config: ModelConfig, source: str) -> ModelConfig:
    """`config` after the checks every model builder relies on: positive bounded sizes, heads that
    divide, a rotary width inside the head, finite positive epsilon / RoPE bases. A corrupt file is
    refused here, naming `source`, instead of dividing by zero or giving NaN logits later."""
    _check_sizes(source, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                 intermediate_size=config.intermediate_size, num_layers=config.num_layers,
                 num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                 max_position_embeddings=config.max_position_embeddings)
    if config.num_heads % config.num_kv_heads:
        raise CorruptModelFileError(f"{source}: {config.num_heads} attention heads cannot be shared by "
                                    f"{config.num_kv_heads} KV heads; the model file is corrupt")
    rope_dim = config.rotary_dim
    if not 0 < rope_dim <= config.head_dim or rope_dim % 2:
        raise CorruptModelFileError(f"{source}: the rotary width {rope_dim} must be even and within the head size "
                                    f"{config.head_dim}; the model file is corrupt")
    _check_positive(source, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                    rope_local_theta=config.rope_local_theta, attn_logit_softcapping=config.attn_logit_softcapping,
                    final_logit_softcapping=config.final_logit_softcapping,
                    query_pre_attn_scalar=config.query_pre_attn_scalar)
    if config.rms_norm_eps >= 1:
        raise CorruptModelFileError(f"{source}: a norm epsilon of {config.rms_norm_eps} is not plausible (below 1 "
                                    "expected); the model file is corrupt")
    windows = [config.sliding_window, *(config.layer_sliding_windows or ())]
    if any(w is not None and w <= 0 for w in windows):
        raise CorruptModelFileError(f"{source}: a sliding window must be positive; the model file is corrupt")
    if config.num_experts < 0 or not 0 <= config.num_experts_per_tok <= config.num_experts:
        raise CorruptModelFileError(f"{source}: {config.num_experts_per_tok} experts per token of "
                                    f"{config.num_experts}; the model file is corrupt")
    return config


def with_generation_eos(config: ModelConfig, model_dir: str) -> ModelConfig:
    """`config` with the end-of-sequence ids of the checkpoint's `generation_config.json` added."""
    generation = read_json_object(os.path.join(model_dir, "generation_config.json"), missing_ok=True)
    eos = generation.get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return config.replace(eos_token_ids=list(dict.fromkeys([*config.eos_token_ids, *(int(e) for e in extra)])))


def _gguf_layer_windows(arch: str, num_layers: int, get) -> list[int | None]:
    """The sliding window of each layer, as llama.cpp decides it for the architecture."""
    window = int(get("attention.sliding_window", 0) or 0)
    if arch == "gemma2":
        window = window or 4096
        default_pattern = 2
    elif arch == "gemma3":
        default_pattern = 6
    else:
        default_pattern = 1  # every layer (llama.cpp ignores the window for some of these; HF applies it)
    if window <= 0:
        return [None] * num_layers
    pattern = get("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):  # one bool per layer
        return [window if pattern[i] else None for i in range(num_layers)]
    pattern = int(pattern)
    if arch not in ("gemma2", "gemma3") and pattern == default_pattern:
        return [window] * num_layers
    # llama.cpp's set_swa_pattern: layer i slides unless it is the last of each group of `pattern`.
    return [window if pattern == 0 or i % pattern < pattern - 1 else None for i in range(num_layers)]


def _gguf_rope_scaling(arch: str, get) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", None)
    original = int(get("rope.scaling.original_context_length", 0) or 0)
    if arch == "phi3" and original:  # LongRoPE: the factors are tensors (rope_factors_short/long)
        return {"rope_type": "longrope", "original_max_position_embeddings": original,
                "attention_factor": float(get("rope.scaling.attn_factor", 1.0))}
    if not kind or kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0)),
               "original_max_position_embeddings": original}
    if kind == "yarn":
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                                 ("yarn_attn_factor", "attention_factor")):
            value = get(f"rope.scaling.{gguf_key}", None)
            if value is not None:
                scaling[hf_key] = float(value)
    return scaling


def _hf_rope(cfg: dict[str, Any], family: str, head_dim: int, max_positions: int, source: str) -> dict[str, Any]:
    """theta, rotary dims, scaling dict and the local-layer theta from either config spelling."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    per_layer_type = "full_attention" in params or "sliding_attention" in params
    global_params = dict((params.get("full_attention") if per_layer_type else params) or {})
    local_params = dict(params.get("sliding_attention") or {}) if per_layer_type else {}
    theta = float(global_params.get("rope_theta") or cfg.get("rope_theta")
                  or HF_DEFAULT_ROPE_THETA.get(str(cfg.get("model_type")), 10000.0))
    partial = float(global_params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    kind = global_params.get("rope_type") or global_params.get("type")
    scaling = None
    if kind not in (None, "default"):
        scaling = {k: v for k, v in global_params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling["rope_type"] = kind
        if kind in ("llama3", "yarn", "longrope", "su"):
            # Phi-3 keeps the pretraining length outside the rope dict; HF gives that one priority.
            scaling["original_max_position_embeddings"] = int(
                cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                or max_positions)
    local_theta = None
    if family == "gemma3":
        local_kind = local_params.get("rope_type") or local_params.get("type")
        if local_kind not in (None, "default"):
            raise NotSupportedError(f"{source}: rope scaling {local_kind!r} on sliding-window layers is not supported")
        local_theta = float(local_params.get("rope_theta") or cfg.get("rope_local_base_freq") or 10000.0)
    return {"theta": theta, "dim": int(head_dim * partial), "scaling": scaling, "local_theta": local_theta}


def _hf_layer_windows(cfg: dict[str, Any], family: str, num_layers: int) -> list[int | None]:
    """The sliding window of each layer: `layer_types` when the config lists them (transformers 5),
    else each family's transformers-4 rule."""
    window = cfg.get("sliding_window")
    window = int(window) if window else None
    layer_types = cfg.get("layer_types")
    if family in ("gemma", "phi2") or window is None:
        return [None] * num_layers
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:num_layers]]
    if family == "gemma2":
        return [window if i % 2 == 0 else None for i in range(num_layers)]
    if family == "gemma3":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return [window if (i + 1) % pattern else None for i in range(num_layers)]
    if family == "qwen2":
        first = int(cfg.get("max_window_layers") or 0)
        return [window if cfg.get("use_sliding_window") and i >= first else None for i in range(num_layers)]
    return [window] * num_layers
