"""`load_model(spec) -> LoadedModel`: the one path from what a user names to a model in memory.

A spec names a GGUF / GGML file, a directory or Hub repo holding one, or a Hugging Face
safetensors directory or repo; the loader resolves the files, reads the config and the
tokenizer (tokenizer.json, or rebuilt from GGUF metadata), picks the chat template,
merges LoRA adapters and builds the weights, every projection through an ISQ factory
(so `--isq` quantizes at load, the ISQ cache short-cuts it, and re-ISQ can redo it while
serving). A vision-language checkpoint also gets its image side (`LoadedModel.vision`).
The target model and the speculative draft model both load here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..errors import NotSupportedError
from .chat_template import ChatTemplate
from .ggml import open_model_file
from .hub import resolve_model_files, resolve_tokenizer_source
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """What to load and how; the names follow `LLM(...)`'s keywords and the CLI flags."""

    model: str | None = None  # path, repo id, or None for the default model
    gguf_file: str | None = None  # the .gguf file in `model` (a directory or repo)
    tokenizer: str | None = None  # tokenizer files (path or repo id) instead of the model's own
    token_source: str = "cache"
    revision: str | None = None
    dtype: str = "auto"
    cpu_weights: str = "quantized"  # GGUF weights: "quantized" (packed at the file's bits) or "f32" (dequantized)
    chat_template: str | None = None  # a template file or literal overriding the tokenizer's
    gqa: int | None = None  # legacy GGML: the KV-head grouping, checked against the tensors
    isq: str | int | None = None  # in-situ quantization type
    isq_cache: str | None = None  # a directory caching ISQ results between starts
    lora_adapters: list[str] | str | None = None
    lora_weights: list[float] | None = None
    xlora_model_id: str | None = None  # an X-LoRA model (loading/adapters/xlora.py)
    xlora_order: str | None = None  # its mistral.rs ordering file
    tgt_non_granular_index: int | None = None  # X-LoRA scalings fixed from this position on (models/xlora.py)
    # Why a vision checkpoint may not load here (e.g. as a draft model), or None to allow it.
    refuse_vision: str | None = None
    tensor_parallel_size: int = 1  # devices the model will be split over: checked before any weight loads


@dataclass
class LoadedModel:
    model: Any  # the nnx language model
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    name: str  # for logs and /v1/models
    path: str  # the file or directory the weights came from
    kind: str  # "gguf" (GGUF or legacy GGML) or "plain" (safetensors)
    isq_type: str | None
    isq_factory: Any  # the quant.isq.ISQFactory every projection was built through
    vision: Any = None  # models.vision's image side of a vision-language checkpoint, else None
    lora: Any = None  # the loading.adapters.lora.LoraMerger merged in, else None
    xlora: Any = None  # the loading.adapters.xlora.XLoraCheckpoint served, else None (then `model` is an
    # XLoraCausalLM and `config.num_layers` counts its KV-cache layers, see models/xlora.py)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids)


def _config_json_near(*sources: str | None) -> str | None:
    """The first config.json beside one of `sources` (a directory, or a file in one)."""
    for source in sources:
        if not source:
            continue
        directory = source if os.path.isdir(source) else os.path.dirname(source)
        path = os.path.join(directory, "config.json")
        if os.path.isfile(path):
            return path
    return None


def _load_lora(adapters: list[str] | str | None, weights: list[float] | None, token_source: str):
    """The LoraMerger of the adapters, or None without adapters."""
    if not adapters:
        if weights:
            raise NotSupportedError("lora_weights were given without lora_adapters")
        return None
    from .adapters.lora import LoraMerger

    return LoraMerger.load([adapters] if isinstance(adapters, str) else list(adapters), weights, token_source)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load `spec` (see the module docstring). Raises the package's typed errors for what a
    user can get wrong: unknown paths, unreachable repos, unsupported architectures, bad
    ISQ types or adapters."""
    from ..models.registry import check_gguf_architecture
    from ..quant.isq import normalize_isq_type

    # Normalized before anything loads, so a bad --isq fails at once; LoRA adapters are read
    # (and checked) before the base model for the same reason.
    isq_type = normalize_isq_type(spec.isq) if spec.isq is not None else None
    lora = _load_lora(spec.lora_adapters, spec.lora_weights, spec.token_source)
    from .adapters.xlora import XLoraAttacher, check_xlora_request, load_xlora

    check_xlora_request(spec.xlora_model_id, spec.xlora_order, spec.tgt_non_granular_index)
    xlora = None
    if spec.xlora_model_id is not None:
        if lora is not None:
            raise NotSupportedError("LoRA adapters and an X-LoRA model cannot be combined")
        xlora = XLoraAttacher(load_xlora(spec.xlora_model_id, spec.xlora_order, spec.token_source))
    model = spec.model
    resolved = resolve_model_files(model, gguf_file=spec.gguf_file, token_source=spec.token_source,
                                   revision=spec.revision,
                                   kind="gguf" if spec.gguf_file or model is None or str(model).endswith(".gguf")
                                   else "auto")
    tokenizer_source = resolve_tokenizer_source(spec.tokenizer, spec.token_source)  # a repo id -> its files
    if resolved.kind == "plain":  # a Hugging Face directory: config.json + *.safetensors
        from ..models.vision import vision_text_config
        from .safetensors import build_model_from_hf, load_hf_config

        path = resolved.model_dir
        # A vision-language checkpoint is served as its language model plus its image side.
        vision_config = vision_text_config(path)
        if vision_config is not None and spec.refuse_vision:  # refused before any weight loads
            raise NotSupportedError(spec.refuse_vision)
        config = vision_config or load_hf_config(path)
        tokenizer = load_tokenizer(tokenizer_source or path)

        def build(wrap):
            return build_model_from_hf(path, config, dtype=spec.dtype, wrap_linear=wrap)
    else:
        from ..models.model_config import config_from_gguf
        from .gguf_weights import build_model_from_gguf

        path = resolved.gguf_path
        # A legacy GGML file lacks eps / RoPE base / context: a config.json beside the
        # tokenizer or the file supplies them (llama.cpp's --model-metadata-dir).
        gguf = open_model_file(path, gqa=spec.gqa, config_path=_config_json_near(tokenizer_source, path))
        check_gguf_architecture(path, gguf.architecture)
        config = config_from_gguf(gguf.metadata, path)
        tokenizer = (load_tokenizer(tokenizer_source) if tokenizer_source
                     else Tokenizer.from_gguf_metadata(gguf.metadata, source=path))

        def build(wrap):
            return build_model_from_gguf(gguf, config, cpu_weights=spec.cpu_weights, dtype=spec.dtype,
                                         wrap_linear=wrap)
    if spec.tensor_parallel_size != 1:
        from ..parallel.mesh import check_divisible

        check_divisible(config, spec.tensor_parallel_size)
    chat_template = ChatTemplate.for_tokenizer(tokenizer, override=spec.chat_template)
    log.info("loading %s (%s, %d layers) weights as %s (dtype %s)", resolved.display_name, config.arch,
             config.num_layers, spec.cpu_weights if resolved.kind == "gguf" else "dense", spec.dtype)
    weights, factory = _build_weights(build, config, path, isq_type, spec.isq_cache, lora or xlora)
    if xlora is not None:
        from .adapters.xlora import build_xlora_model

        weights, config = build_xlora_model(weights, xlora.ckpt, xlora, config, spec.tgt_non_granular_index)
    vision = None
    if resolved.kind == "plain":
        from ..models.vision import load_vision
        from .safetensors import SafetensorsWeights

        vision = load_vision(path, tokenizer, spec.dtype, open_weights=SafetensorsWeights)
    return LoadedModel(weights, config, tokenizer, chat_template, resolved.display_name, path, resolved.kind,
                       isq_type, factory, vision, lora, xlora.ckpt if xlora is not None else None)


def _build_weights(build, config: ModelConfig, path: str, isq_type: str | None, isq_cache: str | None, lora):
    """(model, ISQFactory): `build(wrap_linear)` with every projection going through an
    ISQFactory (even without ISQ, so re-ISQ can quantize later), reading and filling the ISQ
    cache. LoRA adapters are merged outside ISQ, so ISQ and re-ISQ quantize the merged weights."""
    from ..quant.isq import wrap_factory
    from ..quant.isq_cache import isq_cache_key, load_isq_cache, save_isq_cache

    key = cached = None
    if isq_cache is not None and isq_type is not None:
        key = isq_cache_key(path, isq_type, **({"lora": lora.fingerprint()} if hasattr(lora, "fingerprint") else {}))
        cached = load_isq_cache(isq_cache, key)
        log.info("ISQ cache %s: %s", isq_cache, "hit" if cached is not None else "miss")
    factories = []

    def wrap(make_linear):
        factories.append(wrap_factory(make_linear, isq_type, cache=cached))
        return lora.wrap(factories[-1], config) if lora is not None else factories[-1]

    model = build(wrap)
    if lora is not None and hasattr(lora, "finish"):
        lora.finish()
    factory = factories[-1]
    factory.close()
    if isq_type is not None:
        log.info("ISQ %s: %s (%d tensors from the cache)", isq_type, factory.summary(), factory.cache_hits)
    if key is not None and cached is None:
        save_isq_cache(isq_cache, key, factory.quantized_arrays())
    return model, factory
