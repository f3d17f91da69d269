"""Vision-language models: which checkpoints are ones, and loading their image side.

A vision checkpoint is served as its language model (the ordinary text engine, built by
models/registry.py from the nested `language_model.` tensors) plus a `vision` object (llava.py's
`LlavaVision`, llava_next.py's `LlavaNextVision`, idefics2.py's `Idefics2Vision`, phi3v.py's
`Phi3VVision`) that turns images into prompt placeholders and
features. mistral.rs names the
architectures with `vision-plain -a ARCH`; these are its names.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ...config import ModelConfig
from ...errors import NotSupportedError, UnsupportedArchitectureError
from ...json_files import read_json_object
from ..weights import WeightSource

# mistral.rs `-a` name -> what serves it here (None: not supported yet).
VISION_ARCHS: dict[str, str | None] = {
    "llava": "llava",
    "llava_next": "llava_next",
    "phi3v": "phi3v",
    "idefics2": "idefics2",
    "idefics3": None,
    "vllama": None,
    "qwen2vl": None,
    "qwen2_5vl": None,
    "minicpmo": None,
    "phi4mm": None,
    "gemma3": None,
    "mistral3": None,
    "llama4": None,
}
SUPPORTED_VISION_ARCHS = sorted(name for name, served in VISION_ARCHS.items() if served)

# HF config.json `architectures` / `model_type` -> mistral.rs architecture name.
HF_VISION_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Phi3VForCausalLM": "phi3v",
    "Idefics2ForConditionalGeneration": "idefics2",
    "Idefics3ForConditionalGeneration": "idefics3",
    "MllamaForConditionalGeneration": "vllama",
    "Qwen2VLForConditionalGeneration": "qwen2vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5vl",
    "Mistral3ForConditionalGeneration": "mistral3",
    "Llama4ForConditionalGeneration": "llama4",
}
HF_VISION_MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next", "phi3_v": "phi3v", "idefics2": "idefics2",
                         "idefics3": "idefics3", "mllama": "vllama", "qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2_5vl",
                         "mistral3": "mistral3", "llama4": "llama4"}
# The original (pre-transformers) LLaVA release: another weight layout, without the CLIP weights.
ORIGINAL_LLAVA_ARCHITECTURES = {"LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM"}


def check_vision_arch(name: str) -> str:
    """A `vision-plain -a` value, checked: the served architecture, or a NotSupportedError naming the supported."""
    key = name.strip().lower().replace("-", "_")
    if VISION_ARCHS.get(key):
        return key
    what = "is not supported yet" if key in VISION_ARCHS else "is not a known vision architecture"
    raise NotSupportedError(f"vision architecture {name!r} {what} in mistralrs-jax "
                            f"(supported: {', '.join(SUPPORTED_VISION_ARCHS)})")


def vision_architecture(model_dir: str) -> str | None:
    """The mistral.rs vision architecture of a checkpoint directory, None for a text-only model;
    a vision model this build cannot serve raises UnsupportedArchitectureError."""
    cfg = read_json_object(os.path.join(model_dir, "config.json"), missing_ok=True)
    names = [a for a in (cfg.get("architectures") or []) if isinstance(a, str)]
    if any(name in ORIGINAL_LLAVA_ARCHITECTURES for name in names):
        raise UnsupportedArchitectureError(
            f"{model_dir}: this is an original-format LLaVA checkpoint ({', '.join(names)}); use its Hugging Face "
            "conversion (LlavaForConditionalGeneration, e.g. the llava-hf/* repositories)")
    arch = next((HF_VISION_ARCHITECTURES[n] for n in names if n in HF_VISION_ARCHITECTURES), None)
    if arch is None and not names:
        arch = HF_VISION_MODEL_TYPES.get(cfg.get("model_type"))
    if arch is None:
        return None
    if not VISION_ARCHS.get(arch):
        raise UnsupportedArchitectureError(
            f"{model_dir}: the vision architecture {arch} ({', '.join(names) or cfg.get('model_type')}) is not "
            f"supported yet in mistralrs-jax (supported vision architectures: {', '.join(SUPPORTED_VISION_ARCHS)})")
    return arch


def vision_text_config(model_dir: str) -> ModelConfig | None:
    """The language model's config of a vision checkpoint (None for a text-only model)."""
    arch = vision_architecture(model_dir)
    if arch is None:
        return None
    if arch == "idefics2":
        from .idefics2 import Idefics2Config

        return Idefics2Config.from_model_dir(model_dir).text
    if arch == "phi3v":
        from .phi3v import Phi3VConfig

        return Phi3VConfig.from_model_dir(model_dir).text
    from .llava import LlavaConfig

    return LlavaConfig.from_model_dir(model_dir).text


def load_vision(model_dir: str, tokenizer, dtype: str = "auto", *, open_weights: Callable[[str, Any], WeightSource]):
    """The image side (llava.py's `LlavaVision`, llava_next.py's `LlavaNextVision`, idefics2.py's
    `Idefics2Vision`) of a vision checkpoint, or None for a text-only model. `open_weights(model_dir,
    dtype)` opens the checkpoint's tensors as a context-managed WeightSource (the loader passes
    loading/safetensors.py's `SafetensorsWeights`; models/ never imports loading/)."""
    arch = vision_architecture(model_dir)
    if arch is None:
        return None
    from ..registry import resolve_dtype

    if arch == "idefics2":
        from .idefics2 import Idefics2Config, Idefics2Vision

        config = Idefics2Config.from_model_dir(model_dir)
        weight_dtype = resolve_dtype(dtype, config.text.dtype)
        with open_weights(model_dir, weight_dtype) as source:
            return Idefics2Vision(model_dir, config, tokenizer, source, dtype=weight_dtype)
    if arch == "phi3v":
        from .phi3v import Phi3VConfig, Phi3VVision

        config = Phi3VConfig.from_model_dir(model_dir)
        weight_dtype = resolve_dtype(dtype, config.text.dtype)
        with open_weights(model_dir, weight_dtype) as source:
            return Phi3VVision(model_dir, config, tokenizer, source, dtype=weight_dtype)
    from .llava import LlavaConfig, LlavaVision
    from .llava_next import LlavaNextVision

    config = LlavaConfig.from_model_dir(model_dir)
    image_token = tokenizer.id_to_token(config.image_token_id)
    if image_token is None:
        raise UnsupportedArchitectureError(
            f"{model_dir}: the tokenizer has no token {config.image_token_id} (the config's image_token_index)")
    vision_class = LlavaNextVision if arch == "llava_next" else LlavaVision
    weight_dtype = resolve_dtype(dtype, config.text.dtype)
    with open_weights(model_dir, weight_dtype) as source:
        return vision_class(model_dir, config, image_token, source, dtype=weight_dtype)
