"""LoRA adapters held unmerged: a fixed-size stack of low-rank factors a `Linear` adds per token.

A merged adapter (loading/adapters/lora.py) changes the weight once for every request. Held
unmerged, several adapters share one base weight and each token chooses how much of each it
gets: per-request LoRA gives a token one adapter (a one-hot row), X-LoRA mixes all of them
with classifier-made scalings. The stack has a fixed number of slots and a fixed rank, so
loading, replacing or clearing an adapter rewrites arrays of the same shapes and nothing
compiles again; an empty slot is zeros and adds nothing.

A Linear with a stack computes

    y = base(x) + sum_n w[t, n] * (x[t] @ A[n]) @ B[n]

with A[n] [in, r] and B[n] [r, out] in f32 (PEFT's lora_alpha/r, or /sqrt(r) with rsLoRA,
folded into B; ranks below r zero-padded). They are held side by side, A as [in, n*r] and B as
[n*r, out], so the term is two plain matmuls, (x @ A) scaled per token and slot block, then
@ B: on XLA:CPU 4x faster than einsums over an [n, in, r] stack (which transpose it each step). The per-token weights w [T, n] are not an
argument of every module's call: the model sets them once around a layer with
`adapter_scalings(w)`, a trace-time context every adapted Linear inside reads. With no stack
or no context a Linear is exactly the plain projection (the same compiled graph).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The scalings the Linears being traced apply; a ContextVar so a warm-up compile on another
# thread and the serving thread each see their own.
_SCALINGS: contextvars.ContextVar = contextvars.ContextVar("adapter_scalings", default=None)


@contextlib.contextmanager
def adapter_scalings(weights):
    """Within the block, every Linear holding a `LoraStack` adds its adapters mixed by
    `weights` [T, n_adapters] (one row per token of the step). None: base projections only."""
    token = _SCALINGS.set(weights)
    try:
        yield
    finally:
        _SCALINGS.reset(token)


def current_scalings():
    """The [T, n_adapters] weights set by the enclosing `adapter_scalings`, or None."""
    return _SCALINGS.get()


def one_hot_scalings(slots: jax.Array, num_slots: int) -> jax.Array:
    """Per-token slot indices [T] int32 (-1: no adapter) -> one-hot weights [T, num_slots] f32."""
    return (slots[:, None] == jnp.arange(num_slots, dtype=slots.dtype)[None, :]).astype(jnp.float32)


class LoraWeight(nnx.Variable):
    """An adapter stack's factor: model state (it travels with the weights into the jitted
    step), but not an `nnx.Param`, so weight-size accounting and re-quantization leave it alone."""


class LoraStack(nnx.Module):
    """A, B for `num_adapters` adapters of one projection, f32: A [in, n * rank] and B [n * rank, out],
    adapter i in columns (rows) i * rank : (i + 1) * rank."""

    def __init__(self, in_features: int, out_features: int, num_adapters: int, rank: int):
        self.num_adapters, self.rank = int(num_adapters), int(rank)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.a = LoraWeight(jnp.zeros((in_features, num_adapters * rank), jnp.float32))
        self.b = LoraWeight(jnp.zeros((num_adapters * rank, out_features), jnp.float32))

    @property
    def nbytes(self) -> int:
        return int(self.a[...].nbytes + self.b[...].nbytes)

    def set_slot(self, slot: int, a: np.ndarray | None, b: np.ndarray | None) -> None:
        """Put one adapter's factors in `slot`: a [in, r], b [r, out] with r <= rank and the
        scale already folded into b; None clears the slot. Same shapes, so no recompile."""
        a_full = np.zeros((self.in_features, self.rank), np.float32)
        b_full = np.zeros((self.rank, self.out_features), np.float32)
        if a is not None:
            r = a.shape[1]
            if a.shape[0] != self.in_features or b.shape != (r, self.out_features) or r > self.rank:
                raise ValueError(f"adapter factors {list(a.shape)} @ {list(b.shape)} do not fit a stack of "
                                 f"[{self.in_features}, {self.rank}] @ [{self.rank}, {self.out_features}]")
            a_full[:, :r], b_full[:r] = a, b
        block = slice(slot * self.rank, (slot + 1) * self.rank)
        self.a[...] = self.a[...].at[:, block].set(a_full)
        self.b[...] = self.b[...].at[block].set(b_full)

    def attach_to(self, linear) -> "LoraStack":
        """Make this the stack `linear` (a layers.Linear) adds; returns self."""
        if (linear.in_features, linear.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"a [{self.in_features}, {self.out_features}] adapter stack cannot go on a "
                             f"[{linear.in_features}, {linear.out_features}] projection")
        linear.lora = nnx.data(self)  # `lora` starts as a static None; the stack is model state
        return self

    def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """The adapters' term [T, out] in f32 for x [T, in] and weights [T, n]."""
        num_tokens = x.shape[0]
        xa = (x.astype(jnp.float32) @ self.a[...]).reshape(num_tokens, self.num_adapters, self.rank)
        xa = xa * weights.astype(jnp.float32)[:, :, None]
        return xa.reshape(num_tokens, self.num_adapters * self.rank) @ self.b[...]
