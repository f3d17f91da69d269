"""Mixtral's sparse mixture-of-experts feed-forward block (the llama layer's MLP in MoE models).

Routing follows HF/llama.cpp: softmax over the router logits in f32, keep the top-k experts,
renormalise their weights to sum to 1, and sum the chosen experts' SwiGLU outputs weighted so.

Two ways to compute it, picked from the (static) number of tokens in the step:
- few tokens (decode): gather only the chosen experts' weight matrices per token. Decode is
  memory-bound, so reading k of E experts instead of all E is the win.
- many tokens (prefill): every expert runs densely on every token and the outputs are mixed
  with the routing weights (zero for unchosen experts). Gathering per token would copy far
  more weight bytes than running all E experts costs; a grouped (ragged) matmul kernel is
  the GPU improvement to make here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import Linear, activation


class SparseMoE(nnx.Module):
    def __init__(self, router: Linear, gate: np.ndarray, up: np.ndarray, down: np.ndarray, top_k: int, act: str,
                 dtype=jnp.float32):
        """gate/up: [experts, ff, hidden] and down: [experts, hidden, ff], in HF orientation."""
        self.router = router
        # Held as [experts, in, out] so each expert is a plain x @ w.
        self.gate = nnx.Param(jnp.asarray(np.swapaxes(gate, 1, 2), dtype))
        self.up = nnx.Param(jnp.asarray(np.swapaxes(up, 1, 2), dtype))
        self.down = nnx.Param(jnp.asarray(np.swapaxes(down, 1, 2), dtype))
        self.num_experts = int(gate.shape[0])
        self.top_k = top_k
        self.act = act

    def routing(self, x):
        """(expert ids [T, k], weights [T, k]) for each token."""
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)
        return experts, weights / weights.sum(axis=-1, keepdims=True)

    def __call__(self, x):
        experts, weights = self.routing(x)
        act = activation(self.act)
        num_tokens = x.shape[0]
        x32 = x.astype(jnp.float32)
        if num_tokens * self.top_k < self.num_experts:
            gate = self.gate[...][experts].astype(jnp.float32)  # [T, k, hidden, ff]
            up = self.up[...][experts].astype(jnp.float32)
            down = self.down[...][experts].astype(jnp.float32)  # [T, k, ff, hidden]
            h = act(jnp.einsum("th,tkhf->tkf", x32, gate)) * jnp.einsum("th,tkhf->tkf", x32, up)
            out = jnp.einsum("tkf,tkfh->tkh", h, down)
            return jnp.einsum("tkh,tk->th", out, weights).astype(x.dtype)
        mix = jnp.zeros((num_tokens, self.num_experts), jnp.float32)
        mix = mix.at[jnp.arange(num_tokens)[:, None], experts].set(weights)
        h = act(jnp.einsum("th,ehf->etf", x32, self.gate[...].astype(jnp.float32)))
        h = h * jnp.einsum("th,ehf->etf", x32, self.up[...].astype(jnp.float32))
        out = jnp.einsum("etf,efh->eth", h, self.down[...].astype(jnp.float32))
        return jnp.einsum("eth,te->th", out, mix).astype(x.dtype)


def build_moe(source, config, layer: int, dtype) -> SparseMoE:
    prefix = f"model.layers.{layer}.block_sparse_moe"
    return SparseMoE(source.linear(prefix + ".gate"), source.experts(layer, "gate"), source.experts(layer, "up"),
                     source.experts(layer, "down"), config.num_experts_per_tok, config.hidden_act, dtype=dtype)
