"""The few Pallas/JAX API spots that differ between JAX 0.10.x (CPU machines) and 0.11.x (GPU machines).

Everything version-dependent that the kernels touch goes through here, so a JAX upgrade
is one file to read:
- the Triton compiler-params class (`pallas.triton.CompilerParams` today; older releases
  spelled it `pallas.TritonCompilerParams` or took a plain dict);
- whether the Triton lowering is importable at all (0.11 deprecates it in favour of
  Mosaic GPU; a later release may drop it, and then `dispatch()` must fall back);
- the marker for a squeezed block dimension (`pl.squeezed`; `None` in older releases);
- lowering a function for CUDA on a machine without a GPU, which the tests use to prove a
  kernel passes Pallas' Triton lowering (shape rules, supported primitives) here.

The kernels themselves use only `pl.pallas_call`, `pl.BlockSpec`, `pl.ds`, `pl.program_id`
and plain `jax.lax`/`jnp` ops inside the body (`lax.dot_general`, not the deprecated
`pl.dot`), which are stable across both versions.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.experimental import pallas as pl


SQUEEZED = getattr(pl, "squeezed", None)
"""Block-shape entry for a dimension of size 1 that the kernel does not see."""


@functools.cache
def triton_available() -> bool:
    """True when this JAX ships Pallas' Triton lowering."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_compiler_params(num_warps: int, num_stages: int) -> Any:
    """Compiler params that select the Triton lowering on GPU (and set its launch shape).

    Passing the Triton class explicitly matters on 0.11, where a `pallas_call` without
    params may be routed to Mosaic GPU (`jax_pallas_use_mosaic_gpu`).
    """
    try:
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    except (ImportError, AttributeError):
        pass
    legacy = getattr(pl, "TritonCompilerParams", None)
    if legacy is not None:
        return legacy(num_warps=num_warps, num_stages=num_stages)
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))


def lower_for_cuda(fn: Callable, *args, **kwargs) -> str:
    """StableHLO text of `jax.jit(fn)(*args)` lowered for CUDA, without needing a GPU.

    The Pallas kernels inside are run through the Triton lowering, so unsupported
    primitives or shapes raise here. (Compiling the Triton IR to PTX needs the GPU.)
    """
    jitted = jax.jit(fn, **kwargs)
    if hasattr(jitted, "trace"):
        lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
    else:  # JAX releases before the trace/lower split
        lowered = jitted.lower(*args, _experimental_lowering_platform=("cuda",))  # pragma: no cover
    return lowered.as_text()


def choose_implementation(env_var: str, pallas_available: bool) -> str:
    """'pallas', 'pallas-interpret' or 'reference' for one op: `env_var`
    (reference|pallas|interpret) forces a choice, else Pallas on GPU when its kernel is
    available and the XLA reference elsewhere. Read at trace time."""
    import os

    import jax

    from mistralrs_jax.errors import NotSupportedError

    forced = os.environ.get(env_var, "").strip().lower()
    if forced:
        if forced not in ("reference", "pallas", "interpret"):
            raise NotSupportedError(f"{env_var}={forced!r} is not a choice: set it to reference, "
                                    "pallas or interpret, or unset it")
        if forced == "pallas" and jax.default_backend() != "gpu":
            raise NotSupportedError(f"{env_var}=pallas needs an NVIDIA GPU (the kernel is compiled "
                                    "with Triton); on this backend use interpret (slow, for tests) or reference")
        return "pallas-interpret" if forced == "interpret" else forced
    return "pallas" if jax.default_backend() == "gpu" and pallas_available else "reference"
