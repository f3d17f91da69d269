"""X-LoRA (arXiv:2402.07148) as one model the runner steps like any other.

`XLoraCausalLM` wraps a `CausalLM` whose adapted projections hold an `XLoraStack` (every adapter,
unmerged; loading/adapters/xlora.py puts them there) and the X-LoRA classifier. One call is
two passes over the step's tokens, inside the runner's one jitted step:

1. the scaling pass: the base model with every adapter scaled by `scaling_pass_value` (0 by
   default: the plain base model), writing its own K/V;
2. the classifier reads that pass's last hidden state (after the final norm) and gives each
   token its scalings [T, projections or 1, adapters] (softmax with temperature), then per
   projection the top-k mask, the top-k softmax and the global weight, as PEFT's XLoraLayer;
3. the real pass: the adapters mixed per token by those scalings, writing the real K/V.

Which K/V each pass attends to is what PEFT computes: `XLoraModel.generate` runs without a
KV cache, so every step recomputes the whole sequence twice, and earlier tokens' keys in the
scaling pass are the scaling pass's own (adapters at `scaling_pass_value`), in the real pass
each token's own scalings. Both are causal, so a token's K/V never change once computed and
two paged caches hold them exactly: the KV cache here has 2 x num_layers layers (scaling pass
first, then the real pass) plus, with `tgt_non_granular_index`, a few layers that store each
token's scalings in its KV slot. The loader gives the runner a config whose `num_layers`
counts all of them, so the runner, the block manager, prefix caching and preemption work
unchanged, and nothing is compiled beyond the usual step shapes.

Non-granular scalings (`tgt_non_granular_index` k, mistral.rs' option): a token at position
p >= k takes the scalings of its sequence's token at position k - 1 (read from that token's
KV slot, or from this step when it runs here) instead of its own, so they stay fixed from
then on. mistral.rs counts k in generated tokens on one global counter and then serves one
sequence at a time; here k counts each sequence's own positions, prompt included, so any
number of sequences of any lengths batch together and the result does not depend on them.
A step whose real tokens are all at positions >= k skips the scaling pass on the device
(`lax.cond`), so decoding past k costs one pass, as mistral.rs' cached scalings do.

An adapted lm_head (mistral.rs adapts it; PEFT's XLoraModel cannot load one) needs the
scalings of the rows the runner keeps: `__call__` then appends them to the hidden states and
`logits` splits them off again.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .lora_layers import LoraStack, adapter_scalings


class XLoraStack(LoraStack):
    """A projection's adapter stack that takes its own columns `index * n : (index + 1) * n` of the
    flat per-projection scalings [T, projections * n] the X-LoRA model sets."""

    def __init__(self, in_features: int, out_features: int, num_adapters: int, rank: int, *, index: int):
        super().__init__(in_features, out_features, num_adapters, rank)
        self.index = int(index)

    def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        n = self.num_adapters
        return super().__call__(x, weights[:, self.index * n:(self.index + 1) * n])


def mix_scalings(scalings: jax.Array, top_k: int | None, softmax_topk: bool, global_weight: float) -> jax.Array:
    """PEFT's per-projection treatment of the classifier's scalings [..., n]: keep the top k
    (the rest 0), optionally softmax over the kept ones, times the global scaling weight."""
    if top_k is not None:
        _, picked = jax.lax.top_k(scalings, top_k)
        keep = jnp.sum(jax.nn.one_hot(picked, scalings.shape[-1], dtype=scalings.dtype), axis=-2)
        scalings = scalings * keep
    if softmax_topk:
        nonzero = scalings != 0
        soft = jax.nn.softmax(jnp.where(nonzero, scalings, -jnp.inf), axis=-1)
        scalings = jnp.where(nonzero, soft, 0.0)
    return scalings * jnp.float32(global_weight)


class XLoraClassifier(nnx.Module):
    """Dense layers over the last hidden state -> scalings [T, groups, n] (groups: projections with
    layerwise scalings, else 1), softmaxed with a temperature when enabled."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray | None]], n_adapters: int, *, relu_between: bool,
                 enable_softmax: bool, temperature: float):
        self.weights = nnx.List([nnx.Param(jnp.asarray(np.asarray(w, np.float32).T)) for w, _ in layers])
        self.biases = nnx.List([nnx.Param(jnp.asarray(np.zeros(w.shape[0], np.float32) if b is None else b,
                                                      jnp.float32)) for w, b in layers])
        self.n_adapters = int(n_adapters)
        self.relu_between, self.enable_softmax, self.temperature = relu_between, enable_softmax, float(temperature)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = hidden.astype(jnp.float32)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w[...] + b[...]
            if i < last and self.relu_between:
                x = jax.nn.relu(x)
        scalings = x.reshape(x.shape[0], -1, self.n_adapters)
        if self.enable_softmax:
            scalings = jax.nn.softmax(scalings / jnp.float32(self.temperature), axis=-1)
        return scalings


def scalings_cache_layers(values_per_token: int, num_kv_heads: int, head_dim: int) -> int:
    """KV-cache layers (k, v pairs) needed to keep `values_per_token` f32 scalings per token slot."""
    return math.ceil(values_per_token / (2 * num_kv_heads * head_dim))


class XLoraCausalLM(nnx.Module):
    """The runner's model (`model(input_ids, meta, kv_caches, block_size)` -> (hidden, caches),
    `model.logits(hidden)`) for an X-LoRA checkpoint; see the module docstring."""

    def __init__(self, base: nnx.Module, classifier: XLoraClassifier, *, num_layers: int, num_modules: int,
                 layerwise: bool, top_k: int | None, softmax_topk: bool, scaling_pass_value: float,
                 global_weight: float, lm_head_adapted: bool = False, tgt_non_granular_index: int | None = None,
                 num_kv_heads: int = 1, head_dim: int = 1):
        self.base, self.classifier = base, classifier
        self.num_layers, self.num_modules = int(num_layers), int(num_modules)
        self.n_adapters = classifier.n_adapters
        self.layerwise, self.top_k, self.softmax_topk = layerwise, top_k, softmax_topk
        self.scaling_pass_value, self.global_weight = float(scaling_pass_value), float(global_weight)
        self.lm_head_adapted = lm_head_adapted
        self.tgt_non_granular_index = tgt_non_granular_index
        groups = num_modules if layerwise else 1
        self.scalings_size = groups * self.n_adapters
        self.num_scalings_layers = (scalings_cache_layers(self.scalings_size, num_kv_heads, head_dim)
                                    if tgt_non_granular_index is not None else 0)

    @property
    def num_kv_layers(self) -> int:
        """Layers of the KV cache this model steps over (see the module docstring)."""
        return 2 * self.num_layers + self.num_scalings_layers

    def _flat(self, scalings: jax.Array) -> jax.Array:
        """[T, groups, n] -> the [T, projections * n] every XLoraStack slices its columns from."""
        mixed = mix_scalings(scalings, self.top_k, self.softmax_topk, self.global_weight)
        if not self.layerwise:
            mixed = jnp.broadcast_to(mixed, (mixed.shape[0], self.num_modules, self.n_adapters))
        return mixed.reshape(mixed.shape[0], self.num_modules * self.n_adapters)

    def _scaling_pass_weights(self, num_tokens: int):
        if self.scaling_pass_value == 0.0:
            return None  # every adapter term is 0: exactly the base model
        groups = self.num_modules if self.layerwise else 1
        return self._flat(jnp.full((num_tokens, groups, self.n_adapters), self.scaling_pass_value, jnp.float32))

    def scalings(self, input_ids, meta, kv_caches: list, block_size: int, input_embeds=None, embeds_mask=None):
        """The scaling pass and the classifier: (scalings [T, groups, n], the scaling pass's caches)."""
        extra = {} if input_embeds is None else {"input_embeds": input_embeds, "embeds_mask": embeds_mask}
        hidden, caches = self.base(input_ids, meta, kv_caches, block_size,
                                   adapter_scalings=self._scaling_pass_weights(input_ids.shape[0]), **extra)
        return self.classifier(hidden), caches

    def _fix_after(self, scalings: jax.Array, meta, caches: list, bs: int) -> tuple[jax.Array, list]:
        """Non-granular mode: store every token's scalings in its slot, then give tokens at
        positions >= k the scalings stored for their sequence's position k - 1."""
        k = self.tgt_non_granular_index
        num_tokens, size = scalings.shape[0], self.scalings_size
        shape = caches[0][0].shape[1:]  # (kv_heads, head_dim)
        per_layer = 2 * shape[0] * shape[1]
        flat = jnp.pad(scalings.reshape(num_tokens, size), ((0, 0), (0, per_layer * len(caches) - size)))
        packed = flat.reshape(num_tokens, len(caches), 2, *shape)
        caches = [(kc.at[meta.slot_mapping].set(packed[:, i, 0].astype(kc.dtype)),
                   vc.at[meta.slot_mapping].set(packed[:, i, 1].astype(vc.dtype))) for i, (kc, vc) in enumerate(caches)]
        fixed_pos = max(k - 1, 0)
        slot = meta.block_tables[meta.token_seq, fixed_pos // bs] * bs + fixed_pos % bs
        stored = jnp.stack([jnp.stack([kc[slot], vc[slot]], axis=1) for kc, vc in caches], axis=1)
        stored = stored.reshape(num_tokens, -1)[:, :size].astype(jnp.float32).reshape(scalings.shape)
        return jnp.where((meta.positions >= k)[:, None, None], stored, scalings), caches

    def __call__(self, input_ids, meta, kv_caches: list, block_size: int, input_embeds=None, embeds_mask=None):
        num = self.num_layers
        scaling_caches, real_caches = list(kv_caches[:num]), list(kv_caches[num:2 * num])
        store = list(kv_caches[2 * num:])
        if self.tgt_non_granular_index is None:
            scalings, scaling_caches = self.scalings(input_ids, meta, scaling_caches, block_size, input_embeds,
                                                     embeds_mask)
        else:
            # Once every real token of the step is at position >= k (a decode step past k, say),
            # no scalings of this step are used: the scaling pass is skipped on the device.
            # Padding tokens write to block 0, the null block; real tokens never do.
            needed = jnp.any((meta.slot_mapping >= block_size) & (meta.positions < self.tgt_non_granular_index))
            groups = self.scalings_size // self.n_adapters

            def run(caches):
                return self.scalings(input_ids, meta, caches, block_size, input_embeds, embeds_mask)

            def skip(caches):
                return jnp.zeros((input_ids.shape[0], groups, self.n_adapters), jnp.float32), caches

            scalings, scaling_caches = jax.lax.cond(needed, run, skip, scaling_caches)
            scalings, store = self._fix_after(scalings, meta, store, block_size)
        weights = self._flat(scalings)
        extra = {} if input_embeds is None else {"input_embeds": input_embeds, "embeds_mask": embeds_mask}
        hidden, real_caches = self.base(input_ids, meta, real_caches, block_size, adapter_scalings=weights, **extra)
        if self.lm_head_adapted:  # the lm_head's scalings ride along with the rows the runner picks
            hidden = jnp.concatenate([hidden, weights.astype(hidden.dtype)], axis=-1)
        return hidden, scaling_caches + real_caches + store

    def logits(self, hidden):
        if not self.lm_head_adapted:
            return self.base.logits(hidden)
        size = self.num_modules * self.n_adapters
        with adapter_scalings(hidden[:, -size:].astype(jnp.float32)):
            return self.base.logits(hidden[:, :-size])
