"""Megatron-style sharding rules for a built model, and the placement of its state.

`prepare_model(model, N)` rewrites a built model in place so that every split is a
plain slice of one axis:
- a fused qkv_proj becomes separate q/k/v projections (a device then holds its own heads'
  q, k and v), and a fused gate_up_proj separate gate/up projections;
- with fewer KV heads than devices each KV head's k/v projection columns are repeated
  N / kv_heads times (one KV head per device, the query heads of a device reading the copy
  it holds), and the attention's `num_kv_heads` becomes N;
- each Linear gets a `tp_role`: "column" for q/k/v/gate/up/lm_head (output split), "row"
  for o/down (input split, GSPMD or shard_ops all-reduces the partial sums); the embedding
  is split over the vocabulary (the tied lm_head with it).
Modules are recognised by their attributes (this package sits below `models`).

`shard_state(model, state, mesh)` then places each state leaf with its NamedSharding:
dense [in, out] weights split over out (column) or in (row), packed uint8 [out, row_bytes]
weights over their rows (column) or their row bytes at block boundaries (row), Mixtral's
experts [E, in, ff] / [E, ff, hidden] over ff inside every expert, everything else
(norms, rotary tables, routers, row-parallel biases) replicated.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..errors import TensorParallelError
from ..quant.packed import PackedWeight, block_geometry
from .mesh import TP_AXIS
from .shard_ops import COLUMN, ROW

KV_CACHE_SPEC = P(None, TP_AXIS, None)  # [slots, kv_heads, head_dim]: split over KV heads


def _is_linear(node) -> bool:
    return isinstance(node, nnx.Module) and hasattr(node, "quantized") and hasattr(node, "in_features")


def _rebuild(linear, cols: np.ndarray | slice, heads: tuple[int, int, int] | None = None):
    """A Linear of the same class holding output columns `cols` of `linear` (dense [in, out],
    packed rows [out, row_bytes], bias [out]); `heads` = (kv_heads, head_dim, repeat): repeat
    each head's columns `repeat` times instead."""

    def take(a: np.ndarray, out_axis: int) -> np.ndarray:
        if heads is None:
            return np.take(a, np.arange(a.shape[out_axis])[cols], axis=out_axis)
        kv, head_dim, repeat = heads
        shape = a.shape[:out_axis] + (kv, head_dim) + a.shape[out_axis + 1:]
        repeated = np.repeat(a.reshape(shape), repeat, axis=out_axis)
        return repeated.reshape(a.shape[:out_axis] + (-1,) + a.shape[out_axis + 1:])

    bias = None if linear.bias is None else take(np.asarray(linear.bias[...]), 0)
    if linear.quantized:
        packed = PackedWeight(take(np.asarray(linear.blocks[...]), 0), linear.qtype, linear.in_features)
        return type(linear)(packed=packed, bias=bias)
    weight = linear.weight[...]
    return type(linear)(take(np.asarray(weight), 1), bias=bias, dtype=weight.dtype)


def _prepare_attention(attn, tp: int) -> int:
    rebuilt = 0
    q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    if attn.qkv_proj is not None:
        fused = attn.qkv_proj
        # nnx.data: the attributes held None (static) until now.
        attn.q_proj = nnx.data(_rebuild(fused, slice(0, q_size)))
        attn.k_proj = nnx.data(_rebuild(fused, slice(q_size, q_size + kv_size)))
        attn.v_proj = nnx.data(_rebuild(fused, slice(q_size + kv_size, q_size + 2 * kv_size)))
        attn.qkv_proj = None
        rebuilt += 1
    if attn.num_kv_heads < tp:
        heads = (attn.num_kv_heads, attn.head_dim, tp // attn.num_kv_heads)
        attn.k_proj = nnx.data(_rebuild(attn.k_proj, slice(None), heads))
        attn.v_proj = nnx.data(_rebuild(attn.v_proj, slice(None), heads))
        attn.num_kv_heads = tp
        rebuilt += 1
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.tp_role = COLUMN
    attn.o_proj.tp_role = ROW
    return rebuilt


def _prepare_mlp(mlp) -> int:
    rebuilt = 0
    if getattr(mlp, "gate_up_proj", None) is not None:
        fused, half = mlp.gate_up_proj, mlp.gate_up_proj.out_features // 2
        mlp.gate_proj = nnx.data(_rebuild(fused, slice(0, half)))
        mlp.up_proj = nnx.data(_rebuild(fused, slice(half, None)))
        mlp.gate_up_proj = None
        rebuilt = 1
    for proj in (getattr(mlp, "gate_proj", None), mlp.up_proj):
        if proj is not None:
            proj.tp_role = COLUMN
    mlp.down_proj.tp_role = ROW
    return rebuilt


def prepare_model(model: nnx.Module, tp: int) -> int:
    """Rewrite `model` in place for `tp` devices (see the module docstring). Idempotent.
    Returns how many projections it replaced by re-laid-out copies (fused ones split, KV heads
    repeated): those are no longer the objects the ISQ factory re-quantizes."""
    if tp == 1:  # a one-device mesh (a data-parallel replica's): nothing to split, only placed
        return 0
    nodes = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]
    if any(_is_linear(node) and getattr(node, "lora", None) is not None for node in nodes):
        raise TensorParallelError("LoRA adapters are not supported with tensor_parallel_size (-tp) > 1 yet")
    rebuilt = 0
    for node in nodes:
        if hasattr(node, "o_proj") and hasattr(node, "num_kv_heads"):
            rebuilt += _prepare_attention(node, tp)
        elif hasattr(node, "down_proj") and hasattr(node, "up_proj"):
            rebuilt += _prepare_mlp(node)
        elif hasattr(node, "embed_tokens") and hasattr(node, "lm_head"):
            node.embed_tokens.tp_role = COLUMN
            if node.lm_head is not None:
                node.lm_head.tp_role = COLUMN
    return rebuilt


def _linear_specs(linear, name: str, tp: int) -> dict[str, P]:
    role = linear.tp_role
    if role is None:
        return {}
    if role == COLUMN:
        return {"weight": P(None, TP_AXIS), "blocks": P(TP_AXIS, None), "bias": P(TP_AXIS)}
    if linear.quantized:
        block_elems, _ = block_geometry(linear.qtype)
        num_blocks = linear.in_features // block_elems
        if num_blocks % tp:
            raise TensorParallelError(
                f"{name}: a {linear.qtype} weight has {num_blocks} blocks of {block_elems} inputs per row, which do "
                f"not split over tensor_parallel_size (-tp) {tp} devices at block boundaries")
    return {"weight": P(TP_AXIS, None), "blocks": P(None, TP_AXIS)}


def leaf_specs(model: nnx.Module, tp: int) -> dict[tuple, P]:
    """{state path (module path + attribute name): PartitionSpec} for every split leaf."""
    specs: dict[tuple, P] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        per_attr: dict[str, P] = {}
        if _is_linear(node):
            per_attr = _linear_specs(node, ".".join(map(str, path)), tp)
        elif getattr(node, "tp_role", None) == COLUMN:  # the Embedding (a Linear is handled above)
            per_attr = {"table": P(TP_AXIS, None), "blocks": P(TP_AXIS, None)}
        elif hasattr(node, "router") and hasattr(node, "num_experts"):  # SparseMoE
            per_attr = {"gate": P(None, None, TP_AXIS), "up": P(None, None, TP_AXIS), "down": P(None, TP_AXIS, None)}
        for attr, spec in per_attr.items():
            specs[tuple(path) + (attr,)] = spec
    return specs


def _state_path(key_path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path if not isinstance(k, jax.tree_util.GetAttrKey))


def shard_state(model: nnx.Module, state, mesh) -> list[jax.Array]:
    """The flat leaves of `state` (= nnx.split(model)[1], in jax.tree.flatten order), each
    placed on `mesh` with its NamedSharding."""
    specs = leaf_specs(model, int(mesh.shape[TP_AXIS]))
    placed = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = specs.get(_state_path(key_path), P())
        if jax.process_count() > 1:  # from the host: a replicated device_put of a device array over
            leaf = np.asarray(leaf)  # processes leaves one global array where its per-device shards belong
        placed.append(jax.device_put(leaf, NamedSharding(mesh, spec)))
    return placed


def bytes_per_device(arrays) -> dict[str, int]:
    """{device: bytes} of the shards of `arrays` (any pytree of jax.Arrays) each device of this
    process holds. Read from the shardings alone, never the buffers: a KV cache array is donated
    to the step running meanwhile (rule 3), so its buffer may be deleted while /v1/status asks."""
    held: dict[str, int] = {}
    for array in jax.tree.leaves(arrays):
        sharding = getattr(array, "sharding", None)
        if sharding is None:
            continue
        shard_bytes = int(np.prod(sharding.shard_shape(array.shape), dtype=np.int64)) * array.dtype.itemsize
        for device in sharding.addressable_devices:
            held[str(device)] = held.get(str(device), 0) + shard_bytes
    return held


def mesh_report(devices, weights, kv_caches) -> dict:
    """What /v1/status shows of the mesh: its size, its devices, and per device the bytes of
    weights and KV cache it holds (from the arrays' shards) and the runtime's memory
    statistics where the backend keeps them (GPU; None on CPU)."""
    weight_bytes, kv_bytes = bytes_per_device(weights), bytes_per_device(kv_caches)
    per_device = []
    for device in devices:
        local = getattr(device, "process_index", 0) == jax.process_index()  # another host's: not readable here
        stats = device.memory_stats() if local and hasattr(device, "memory_stats") else None
        per_device.append({
            "device": str(device), "weight_bytes": weight_bytes.get(str(device), 0),
            "kv_cache_bytes": kv_bytes.get(str(device), 0),
            "bytes_in_use": (stats or {}).get("bytes_in_use"), "bytes_limit": (stats or {}).get("bytes_limit")})
    return {"tensor_parallel_size": len(devices), "devices": [str(d) for d in devices], "per_device": per_device}
