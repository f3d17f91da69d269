"""Tensor parallelism over a `jax.sharding.Mesh` with one axis, "tp" (issue 15).

- mesh.py: the mesh, the divisibility check run before loading, and what the model code
  asks while tracing (is a tp mesh active, of what size);
- shard_ops.py: the operations that must run per shard under `shard_map` (paged attention,
  the packed quantized matmul, whose CPU kernel is an opaque custom call);
- rules.py: the Megatron sharding rules, applied to a built model (column-parallel
  q/k/v/gate/up, row-parallel o/down, vocab-split embedding and lm_head, Mixtral experts
  split inside each expert) and the placement of its state and KV cache.

Layering: this package sits between `models` (which calls shard_ops) and `pallas_kernels`;
rules.py recognises model modules by their attributes, never by importing models.
"""
