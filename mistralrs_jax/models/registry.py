"""Architecture name -> model builder, and how weights are turned into `Linear`s.

GGUF `general.architecture` and HF `architectures` / `model_type` names map to one model
file per family; a family that differs from llama by a detail is a variant, not a copy.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import NotSupportedError, UnsupportedArchitectureError
from . import llama
from .layers import Linear

log = logging.getLogger(__name__)

# GGUF general.architecture -> builder(gguf, config, make_linear, progress)
GGUF_BUILDERS: dict[str, Callable] = {
    "llama": llama.build_from_gguf,
}

FLOAT_TYPES = {"F32", "F16", "BF16"}


def make_linear_factory(cpu_weights: str) -> Callable:
    """How a GGUF weight becomes a `Linear` (design rule 7).

    "f32": dequantize once at load (XLA:CPU's fast path). "quantized": keep block formats
    as affine int8 (~1 byte/weight), dequantized inside the jitted matmul.
    """
    if cpu_weights not in ("f32", "quantized"):
        raise NotSupportedError(f"cpu_weights must be 'f32' or 'quantized', got {cpu_weights!r}")

    def make_linear(gguf, name: str, row_transform=None) -> Linear:
        tensor = gguf.tensor(name)
        transform = row_transform or (lambda a: a)
        if cpu_weights == "quantized" and tensor.qtype not in FLOAT_TYPES:
            from ..quant import to_affine_int8

            try:
                q, scale, offset, group = to_affine_int8(np.asarray(tensor.data), tensor.qtype, tensor.shape)
            except NotSupportedError:
                log.info("%s (%s) has no exact int8 form; holding it as f32", name, tensor.qtype)
            else:
                return Linear(q=transform(q), scale=transform(scale), offset=None if offset is None else transform(offset),
                              group=group)
        weight = transform(gguf.dequantize(name))  # [out, in]
        return Linear(np.ascontiguousarray(weight.T))

    return make_linear


def build_model_from_gguf(gguf, config: ModelConfig, cpu_weights: str = "f32"):
    builder = GGUF_BUILDERS.get(config.arch)
    if builder is None:
        raise UnsupportedArchitectureError(
            f"{gguf.path}: architecture {config.arch!r} is not supported (supported: {', '.join(sorted(GGUF_BUILDERS))})"
        )
    with tqdm(total=config.num_layers, desc=f"loading {config.name or config.arch}", unit="layer",
              disable=None, leave=False) as bar:
        return builder(gguf, config, make_linear_factory(cpu_weights), progress=bar.update)
