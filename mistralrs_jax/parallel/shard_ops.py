"""The operations that run once per shard of the "tp" mesh axis, under `jax.shard_map`.

GSPMD partitions the dense matmuls, norms, rotary embeddings and the vocab-split lookups on
its own from the placed weights (rules.py). Two things it cannot split: the paged attention
(the Pallas kernel is an opaque call, and the XLA reference's gathers through the block
tables would be replicated), and the packed quantized matmul (the CPU FFI kernel and the
Pallas kernel are custom calls: GSPMD would gather the whole weight onto every device).
Both run here per shard, each device on its own heads or its own rows/blocks:
- attention: q [T, heads, D] and the KV cache [slots, kv_heads, D] split over heads (a
  device's query heads read exactly its KV heads: rules.py lays the heads out so), the step
  metadata replicated; the cache write happens inside, so the cache never leaves its device;
- a column-parallel packed matmul: x replicated, the weight's output rows split, the output
  split over its last axis;
- a row-parallel packed matmul: x split over its last (input) axis, the weight split along
  its row bytes at block boundaries, the partial products summed with one `psum`.
Without an active tp mesh (`jax.set_mesh`) every function is the plain operation.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.paged_attention import paged_attention, write_kv
from pallas_kernels.quant_matmul import quant_matmul

from .mesh import TP_AXIS, active_tp_size

COLUMN, ROW = "column", "row"  # Linear.tp_role values (rules.py sets them)


def _attend(q, k, v, k_cache, v_cache, meta, kwargs):
    k_cache, v_cache = write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    return paged_attention(q, k_cache, v_cache, meta, **kwargs), k_cache, v_cache


def attention_per_shard(q, k, v, kv, meta, **kwargs):
    """Write this step's k/v [T, kv_heads, D] into the layer's cache pair `kv` and attend:
    (out [T, heads, D], (k_cache, v_cache)). Per head shard when a tp mesh is active."""
    if active_tp_size() == 1:
        out, k_cache, v_cache = _attend(q, k, v, kv[0], kv[1], meta, kwargs)
        return out, (k_cache, v_cache)
    heads = P(None, TP_AXIS, None)
    fn = jax.shard_map(lambda q, k, v, kc, vc, m: _attend(q, k, v, kc, vc, m, kwargs),
                       mesh=jax.sharding.get_abstract_mesh(), in_specs=(heads,) * 5 + (P(),),
                       out_specs=(heads, heads, heads), check_vma=False)
    out, k_cache, v_cache = fn(q, k, v, kv[0], kv[1], meta)
    return out, (k_cache, v_cache)


def quant_matmul_per_shard(x, blocks, qtype: str, role: str | None):
    """x [..., in] @ dequantize(blocks).T, `blocks` uint8 [out, row_bytes] placed as `role`
    says (rules.py): per shard under a tp mesh, else the plain kernel call."""
    if role is None or active_tp_size() == 1:
        return quant_matmul(x, blocks, qtype)
    lead = (None,) * (x.ndim - 1)
    mesh = jax.sharding.get_abstract_mesh()
    if role == COLUMN:
        fn = jax.shard_map(lambda x, b: quant_matmul(x, b, qtype), mesh=mesh,
                           in_specs=(P(), P(TP_AXIS, None)), out_specs=P(*lead, TP_AXIS), check_vma=False)
        return fn(x, blocks)
    if role == ROW:
        fn = jax.shard_map(lambda x, b: jax.lax.psum(quant_matmul(x, b, qtype), TP_AXIS), mesh=mesh,
                           in_specs=(P(*lead, TP_AXIS), P(None, TP_AXIS)), out_specs=P(), check_vma=False)
        return fn(x, blocks)
    raise ValueError(f"unknown tensor-parallel role {role!r}")
