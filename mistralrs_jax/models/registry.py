"""Architecture name -> model builder: the family tables.

A family key is llama.cpp's `general.architecture` name (llama, qwen2, phi2, phi3, gemma,
gemma2, gemma3, starcoder2). HF `architectures` / `model_type` names map onto the same keys
(Mistral and Mixtral are the llama architecture in both worlds), and one builder per family
reads either format through a `WeightSource` (models/weights.py; the two formats:
loading/gguf_weights.py and loading/safetensors.py).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax.numpy as jnp
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import NotSupportedError, UnsupportedArchitectureError
from . import gemma, llama, phi2, starcoder2

log = logging.getLogger(__name__)

# family key -> builder(config, source, progress, dtype)
FAMILY_BUILDERS: dict[str, Callable] = {
    "llama": llama.build,
    "qwen2": llama.build,
    "phi3": llama.build,
    "starcoder2": starcoder2.build,
    "phi2": phi2.build,
    "gemma": gemma.build,
    "gemma2": gemma.build,
    "gemma3": gemma.build,
}

# HF config.json `architectures` entries -> family key.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "PhiForCausalLM": "phi2",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # the text decoder only
    "Starcoder2ForCausalLM": "starcoder2",
}
# HF `model_type` -> family key, for configs without `architectures`.
HF_MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "phi": "phi2", "phi3": "phi3",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "starcoder2": "starcoder2",
}

# llama.cpp fixes the activation per architecture; everything else is SiLU.
GGUF_ACTIVATIONS = {"gemma": "gelu_pytorch_tanh", "gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh",
                    "phi2": "gelu_new", "starcoder2": "gelu_pytorch_tanh"}
# HF config classes whose tie_word_embeddings defaults to True.
HF_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "starcoder2"}
# HF model_type -> default rope base where it is not 10000.
HF_DEFAULT_ROPE_THETA = {"mixtral": 1e6, "gemma3": 1e6, "gemma3_text": 1e6}


def family_of_hf_config(cfg: dict[str, Any], source: str) -> str:
    names = [a for a in (cfg.get("architectures") or []) if isinstance(a, str)]
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    model_type = cfg.get("model_type")
    if not names and model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    what = ", ".join(names) or f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"{source}: architecture {what} is not supported (supported: {', '.join(sorted(HF_ARCHITECTURES))})")


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def resolve_dtype(dtype: str, checkpoint_dtype: str = "float32"):
    """--dtype auto|f32|bf16|f16 -> a jnp dtype for weights. auto: f32 on CPU (XLA:CPU's only fast
    dot), the checkpoint's own dtype elsewhere."""
    import jax

    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise NotSupportedError(f"--dtype must be auto, f32, bf16 or f16, got {dtype!r}")
    if jax.default_backend() == "cpu":
        return jnp.float32
    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(checkpoint_dtype, jnp.float32)


def build_model(config: ModelConfig, source, dtype=jnp.float32):
    """The model of `config.arch` from any WeightSource, with a per-layer progress bar."""
    builder = FAMILY_BUILDERS.get(config.arch)
    if builder is None:
        raise UnsupportedArchitectureError(
            f"{source.path}: architecture {config.arch!r} is not supported "
            f"(supported: {', '.join(sorted(FAMILY_BUILDERS))})")
    if config.num_experts and config.arch != "llama":
        raise NotSupportedError(f"{source.path}: mixture-of-experts layers are supported for the llama "
                                f"architecture (Mixtral) only, not {config.arch}")
    with tqdm(total=config.num_layers, desc=f"loading {config.name or config.arch}", unit="layer",
              disable=None, leave=False) as bar:
        return builder(config, source, progress=bar.update, dtype=dtype)


def check_gguf_architecture(path: str, arch: str | None) -> None:
    """Fail early, naming the file and the architecture, before any model key is read (GGUF
    `general.architecture` names are the family keys themselves)."""
    if arch not in FAMILY_BUILDERS:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(sorted(FAMILY_BUILDERS))})")
