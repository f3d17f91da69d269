"""PEFT LoRA adapters held unmerged on a built model, in fixed-size stacks (models/lora_layers.py).

Two users: per-request LoRA (`--lora-mode dynamic`: every token picks one adapter slot, or none)
and X-LoRA (every token mixes all adapters). Both read adapters with lora.py's `load_adapter`
(PEFT key mapping, option checks, rank/alpha patterns) and place them here on the model's
projections instead of merging them into the weights.

Placement follows the model as built: an adapter on q/k/v_proj (gate/up_proj) lands in its
rows of a fused qkv_proj (gate_up_proj), with each part's A in its own block of the stack's
rank axis (a fused stack is parts x max_rank wide); an adapter trained on a fused projection
is split by rows over separate ones. PEFT's scale (lora_alpha/r, /sqrt(r) with rsLoRA) and the
user weight are folded into B.

Held unmerged, what a merged weight could absorb but a low-rank term cannot is refused by name:
full replacement weights (modules_to_save), bias changes (bias="all"/"lora_only", lora_bias) and
adapters on the lm_head (the logits are taken outside the decoder layers the slots apply to).

`AdapterSlots` is the runtime registry of `--lora-mode dynamic`: adapter names -> slots, loading
into a free slot and freeing one while the engine serves (same shapes, so nothing compiles).
Removal: the name disappears at once (new requests naming it get a 404); sequences already
admitted with it keep its slot until they finish, and the slot is reused only after that.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...errors import InvalidRequestError, NotSupportedError
from ...models.layers import Linear
from ...models.lora_layers import LoraStack
from .lora import FUSED_PROJECTIONS, AdapterMismatchError, LoraAdapter, load_adapter

log = logging.getLogger(__name__)

# HF module names of other families' projections -> the attribute our layers hold them under.
_ALIASES = {"self_attn.dense": "self_attn.o_proj", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
            "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


class LoraNotFoundError(InvalidRequestError):
    """A request names an adapter that is not loaded."""

    http_status = 404

    def __init__(self, message: str, param: str = "lora"):
        super().__init__(message, param=param, code="model_not_found")


class LoraSlotsFullError(InvalidRequestError):
    """Every adapter slot is taken, or the name is taken."""

    http_status = 409

    def __init__(self, message: str, code: str = "lora_slots_full"):
        super().__init__(message, param="name", code=code)


def model_projections(model) -> dict[str, Linear]:
    """The decoder layers' attention and MLP projections of a built CausalLM, by HF module name."""
    found = {}
    for i, layer in enumerate(model.layers):
        for group, names in (("self_attn", _ATTENTION), ("mlp", _MLP)):
            owner = getattr(layer, group, None)
            for name in names:
                linear = getattr(owner, name, None) if owner is not None else None
                if isinstance(linear, Linear):
                    found[f"model.layers.{i}.{group}.{name}"] = linear
    return found


def _fused_sizes(config, fused: str, out_features: int) -> list[int]:
    if fused == "self_attn.qkv_proj":
        return [config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim,
                config.num_kv_heads * config.head_dim]
    return [out_features // 2, out_features // 2]


def stack_rank(name: str, max_rank: int) -> int:
    """Rank width of the stack on projection `name`: one `max_rank` block per fused part."""
    for fused, parts in FUSED_PROJECTIONS.items():
        if name.endswith("." + fused):
            return len(parts) * max_rank
    return max_rank


def _refuse_unmergeable(adapter: LoraAdapter) -> None:
    held = [(m, "replaces its whole weight (modules_to_save)") for m in adapter.weights]
    held += [(m, "changes its bias (bias=all/lora_only)") for m in adapter.biases]
    held += [(m, "has a lora_B bias (lora_bias)") for m, f in adapter.factors.items() if f.bias_b is not None]
    held += [(m, "adapts the lm_head") for m in adapter.factors if m.split(".")[-1] == "lm_head"]
    if held:
        module, what = held[0]
        raise NotSupportedError(f"LoRA adapter {adapter.name}: {module} {what}, which an unmerged (per-request) "
                                "adapter cannot apply; only low-rank updates of the decoder layers' projections can "
                                "be held unmerged (serve it merged: --lora-mode merged)")


def place_adapter(adapter: LoraAdapter, projections: dict[str, Linear], config,
                  max_rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Where `adapter` goes: projection name -> (a [in, stack rank], b [stack rank, out]) in f32,
    scale and user weight folded into b. Raises a typed error naming what does not fit."""
    _refuse_unmergeable(adapter)
    placed: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(name: str, a: np.ndarray, b: np.ndarray, rank_block: int = 0, rows: slice | None = None) -> None:
        linear = projections[name]
        if name not in placed:
            width = stack_rank(name, max_rank)
            placed[name] = (np.zeros((linear.in_features, width), np.float32),
                            np.zeros((width, linear.out_features), np.float32))
        full_a, full_b = placed[name]
        r = a.shape[1]
        start = rank_block * max_rank
        full_a[:, start:start + r] += a
        full_b[start:start + r, rows if rows is not None else slice(None)] += b

    for module, factors in sorted(adapter.factors.items()):
        rank = factors.a.shape[0]
        if rank > max_rank:
            raise InvalidRequestError(f"LoRA adapter {adapter.name}: {module} has rank {rank}, above the server's "
                                      f"--max-lora-rank {max_rank}", param="path", code="lora_rank_too_large")
        prefix, _, inner = module.rpartition(".layers.")
        index, _, inner = inner.partition(".")
        layer = f"model.layers.{index}."
        inner = _ALIASES.get(inner, inner)
        a = factors.a.T.astype(np.float32)  # [in, r]
        b = (adapter.weight * factors.scale * factors.b.T).astype(np.float32)  # [r, out]

        def check(name: str, in_features: int, out_rows: int) -> None:
            linear = projections[name]
            if a.shape[0] != linear.in_features or b.shape[1] != out_rows:
                raise AdapterMismatchError(
                    f"LoRA adapter {adapter.name}: {module} has lora_A {list(factors.a.shape)} and lora_B "
                    f"{list(factors.b.shape)}, but the model's {name} is [{in_features} -> {out_rows}] there; the "
                    f"adapter was trained for {adapter.config.get('base_model_name_or_path') or 'another base model'}")

        target = layer + inner
        if prefix.endswith("model") and target in projections:
            check(target, projections[target].in_features, projections[target].out_features)
            add(target, a, b)
            continue
        done = False
        for fused, parts in FUSED_PROJECTIONS.items():
            if not prefix.endswith("model"):
                break
            if inner in parts and layer + fused in projections:  # separate in the adapter, fused here
                name = layer + fused
                sizes = _fused_sizes(config, fused, projections[name].out_features)
                part = parts.index(inner)
                start = sum(sizes[:part])
                check(name, projections[name].in_features, sizes[part])
                add(name, a, b, rank_block=part, rows=slice(start, start + sizes[part]))
                done = True
            elif inner == fused and all(layer + p in projections for p in parts):  # fused in the adapter
                sizes = [projections[layer + p].out_features for p in parts]
                if sum(sizes) != b.shape[1]:
                    raise AdapterMismatchError(
                        f"LoRA adapter {adapter.name}: {module} updates {b.shape[1]} rows, but the model's separate "
                        f"{', '.join(parts)} have {' + '.join(map(str, sizes))} rows")
                starts = np.cumsum([0, *sizes])
                for p, s, size in zip(parts, starts, sizes):
                    check(layer + p, projections[layer + p].in_features, size)
                    add(layer + p, a, b[:, int(s):int(s) + size])
                done = True
        if not done:
            raise AdapterMismatchError(
                f"LoRA adapter {adapter.name}: it targets {module}, which this model does not have as an adaptable "
                f"projection ({config.arch} architecture, {config.num_layers} layers; unmerged adapters go on the "
                "decoder layers' attention and MLP projections)")
    return placed


class UnmergedAdapters:
    """Stacks of `num_slots` adapters on a built model's projections (all of them, or `modules`)."""

    def __init__(self, model, config, num_slots: int, max_rank: int, modules: set[str] | None = None):
        if num_slots < 1 or max_rank < 1:
            raise InvalidRequestError(f"need at least one adapter slot and rank 1 (got {num_slots} slots, rank "
                                      f"{max_rank})", param="max_loras")
        self.config, self.num_slots, self.max_rank = config, int(num_slots), int(max_rank)
        self.projections = model_projections(model)
        if not self.projections:
            raise NotSupportedError(f"the {config.arch} model has no projections unmerged adapters can go on")
        names = sorted(self.projections if modules is None else modules)
        self.stacks: dict[str, LoraStack] = {}
        for name in names:
            linear = self.projections[name]
            self.stacks[name] = LoraStack(linear.in_features, linear.out_features, self.num_slots,
                                          stack_rank(name, self.max_rank)).attach_to(linear)

    def place(self, adapter: LoraAdapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        placed = place_adapter(adapter, self.projections, self.config, self.max_rank)
        missing = sorted(set(placed) - set(self.stacks))
        if missing:
            raise InvalidRequestError(f"LoRA adapter {adapter.name}: it targets {', '.join(missing[:4])}, which hold "
                                      "no adapter stack here", param="path", code="lora_target_not_present")
        return placed

    def write(self, slot: int, placed: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> None:
        """Fill `slot` of every stack with `placed` (zeros where it has nothing; None clears the slot)."""
        for name, stack in self.stacks.items():
            a, b = (placed or {}).get(name, (None, None))
            stack.set_slot(slot, a, b)

    def reattach(self) -> None:
        """Put the stacks back on their projections after something rebuilt them in place (re-ISQ
        replaces a Linear's attributes, `lora` included)."""
        for name, stack in self.stacks.items():
            stack.attach_to(self.projections[name])

    @property
    def nbytes(self) -> int:
        return sum(stack.nbytes for stack in self.stacks.values())


def load_unmerged(model, config, specs: list[str], weights: list[float] | None = None, max_rank: int | None = None,
                  token_source: str = "cache") -> tuple[UnmergedAdapters, list[LoraAdapter]]:
    """Read the PEFT adapters `specs` and hold them unmerged on `model`, adapter i in slot i, with
    stacks only on the projections some adapter targets (X-LoRA's layout)."""
    weights = [1.0] * len(specs) if weights is None else list(weights)
    adapters = [load_adapter(spec, weight, token_source) for spec, weight in zip(specs, weights)]
    rank = max_rank or max(f.a.shape[0] for a in adapters for f in a.factors.values())
    projections = model_projections(model)
    placements = [place_adapter(adapter, projections, config, rank) for adapter in adapters]
    held = UnmergedAdapters(model, config, len(adapters), rank, modules={n for p in placements for n in p})
    for slot, placed in enumerate(placements):
        held.write(slot, placed)
    return held, adapters


# --------------------------------------------------------------------------- per-request slots


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter in a slot. Requests carry it on their SamplingParams (`lora`); each sequence
    made for it registers with `attach`, so the slot is reused only once they have all finished."""

    name: str
    slot: int
    path: str
    rank: int
    modules: list[str]
    key: int  # unique per load: the prefix cache's salt (a reload under the same name shares nothing)
    removed: bool = False
    _sequences: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attach(self, sequence) -> None:
        with self._lock:
            if self.removed:
                raise LoraNotFoundError(f"the LoRA adapter {self.name!r} was removed before this request started")
            self._sequences.add(sequence)

    def in_use(self) -> int:
        """Sequences made for this adapter that have not finished."""
        with self._lock:
            return sum(1 for seq in list(self._sequences) if not getattr(seq, "is_finished", True))

    def card(self) -> dict:
        return {"id": self.name, "object": "lora", "slot": self.slot, "path": self.path, "rank": self.rank,
                "modules": len(self.modules)}


class AdapterSlots:
    """Per-request LoRA: named adapters in the slots of an `UnmergedAdapters`. `on_change()` is
    called after a slot's arrays change (the runner takes the new arrays: same shapes, no compile)."""

    def __init__(self, held: UnmergedAdapters, on_change: Callable[[], None] | None = None,
                 token_source: str = "cache"):
        self.held = held
        self.on_change = on_change
        self.token_source = token_source
        self._by_name: dict[str, LoadedAdapter] = {}
        self._slots: list[LoadedAdapter | None] = [None] * held.num_slots  # owner, also while draining
        self._lock = threading.Lock()
        self._next_key = 0

    @property
    def num_slots(self) -> int:
        return self.held.num_slots

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def list(self) -> list[LoadedAdapter]:
        with self._lock:
            return [self._by_name[name] for name in sorted(self._by_name)]

    def resolve(self, name: str, param: str = "lora") -> LoadedAdapter:
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None:
                loaded = ", ".join(sorted(self._by_name)) or "none"
                raise LoraNotFoundError(f"the LoRA adapter {name!r} is not loaded (loaded: {loaded}; POST /v1/loras "
                                        "loads one)", param=param)
            return adapter

    def add(self, name: str, path: str, weight: float = 1.0) -> LoadedAdapter:
        """Read the PEFT adapter at `path` and load it into a free slot as `name`."""
        if not isinstance(name, str) or not name or ":" in name or "/" in name:
            raise InvalidRequestError(f"an adapter name must be a non-empty string without ':' or '/', got {name!r}",
                                      param="name")
        with self._lock:
            if name in self._by_name:
                raise LoraSlotsFullError(f"a LoRA adapter named {name!r} is already loaded; DELETE /v1/loras/{name} "
                                         "first", code="lora_name_taken")
        adapter = load_adapter(path, weight, self.token_source)  # outside the lock: reading takes time
        adapter.name = name
        placed = self.held.place(adapter)
        rank = max(f.a.shape[0] for f in adapter.factors.values())
        with self._lock:
            if name in self._by_name:
                raise LoraSlotsFullError(f"a LoRA adapter named {name!r} is already loaded", code="lora_name_taken")
            slot = self._free_slot()
            if slot is None:
                raise LoraSlotsFullError(f"all {self.num_slots} LoRA slots are taken ({', '.join(sorted(self._by_name))}"
                                         "; sequences may still be finishing on a removed one): DELETE one first, or "
                                         "start the server with a larger --max-loras")
            self.held.write(slot, placed)
            self._next_key += 1
            loaded = LoadedAdapter(name, slot, adapter.path, rank, sorted(placed), key=self._next_key)
            self._slots[slot] = loaded
            self._by_name[name] = loaded
            if self.on_change is not None:
                self.on_change()
        log.info("LoRA: loaded adapter %r (%s, rank %d, %d projections) into slot %d", name, adapter.path, rank,
                 len(placed), slot)
        return loaded

    def remove(self, name: str) -> LoadedAdapter:
        """Unload `name`: new requests cannot select it; its slot is freed once its sequences finish."""
        adapter = self.resolve(name, param="name")
        with self._lock, adapter._lock:
            adapter.removed = True
            self._by_name.pop(name, None)
        self._reclaim()
        log.info("LoRA: removed adapter %r from slot %d", name, adapter.slot)
        return adapter

    def _free_slot(self) -> int | None:
        """A free slot (caller holds the lock), reclaiming removed adapters' slots whose sequences finished."""
        for slot, owner in enumerate(self._slots):
            if owner is None:
                return slot
            if owner.removed and owner.in_use() == 0:
                self._slots[slot] = None
                return slot
        return None

    def _reclaim(self) -> None:
        with self._lock:
            cleared = False
            for slot, owner in enumerate(self._slots):
                if owner is not None and owner.removed and owner.in_use() == 0:
                    self._slots[slot] = None
                    self.held.write(slot, None)
                    cleared = True
            if cleared and self.on_change is not None:
                self.on_change()


def adapter_name(spec: str) -> str:
    """The name a start-up adapter is selected by: its directory's (or repo's) last component."""
    return os.path.basename(os.path.normpath(spec)) or spec


def hold_dynamic_adapters(model, config, num_slots: int, max_rank: int, specs: list[str] | str | None = None,
                          weights: list[float] | None = None, token_source: str = "cache") -> AdapterSlots:
    """`--lora-mode dynamic`: stacks of `num_slots` adapters on every attention and MLP projection
    of `model`, with the start-up adapters `specs` loaded into the first slots, each named by
    `adapter_name`."""
    if not hasattr(model, "layers"):
        raise NotSupportedError(f"per-request LoRA (--lora-mode dynamic) is not supported for the {config.arch} "
                                "model (vision models are not yet)")
    specs = [specs] if isinstance(specs, str) else list(specs or [])
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise InvalidRequestError(f"got {len(weights)} LoRA weights for {len(specs)} adapters", param="lora_weights")
    if len(specs) > num_slots:
        raise InvalidRequestError(f"{len(specs)} LoRA adapters were given but --max-loras is {num_slots}",
                                  param="max_loras")
    slots = AdapterSlots(UnmergedAdapters(model, config, num_slots, max_rank), token_source=token_source)
    for spec, weight in zip(specs, weights):
        slots.add(adapter_name(spec), spec, weight)
    log.info("LoRA (dynamic): %d slots of rank %d on %d projections (%.1f MiB), %d loaded at start", num_slots,
             max_rank, len(slots.held.stacks), slots.held.nbytes / 2**20, len(specs))
    return slots
