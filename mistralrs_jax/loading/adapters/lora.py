"""LoRA adapters in PEFT's format, merged into the base model's projections while it loads.

A LoRA adapter adds `scale · B @ A` to a projection's weight [out, in] (A: [r, in], B: [out, r];
scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern` /
`alpha_pattern` override r and alpha per module). Merged once at load, the served model costs
nothing more per step than the base model. Several adapters add up, each delta multiplied by
its user weight (PEFT's `add_weighted_adapter(..., combination_type="cat")` computes the same).

How: every projection the model builders create goes through one hook,
`make_linear(source, tensor_name, row_transform, bias)` (loading/gguf_weights.py, loading/safetensors.py),
which ISQ already wraps (quant/isq.py). `LoraMerger.wrap` puts a layer around that hook: for a
targeted tensor it passes a row transform that first does what the model asked (undoing
llama.cpp's Q/K row permutation for GGUF) and then adds the delta, which is in Hugging Face
orientation. So the f32 weight is merged before ISQ sees it (`--isq` quantizes the merged
weight; re-ISQ re-reads the source and merges again: the transform is what ISQ keeps per
tensor), and GGUF block formats kept as int8 (`--cpu-weights quantized`) are held in f32 for
the merged tensors, since a merged weight is no longer in the file's blocks.

What PEFT writes besides lora_A/lora_B is honoured where it is a projection: a full weight
(`modules_to_save`, or the `base_layer.weight` copy PEFT saves when the lm_head is targeted)
replaces the base weight, a bias (`bias="all"|"lora_only"`) replaces the base bias, and
`lora_bias` adds `scale · lora_B.bias`. Fused projections follow the checkpoint: an adapter on
q/k/v_proj (gate/up_proj) is placed in the rows of a fused qkv_proj (gate_up_proj) tensor, and
an adapter trained on a fused one is split over separate tensors. Everything else (DoRA, LoRA
on embeddings, routed or activated variants) stops the load with a typed error naming the
adapter and the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import InvalidRequestError, ModelLoadError, NotSupportedError
from ...json_files import read_json_object
from ..gguf_weights import gguf_module_name
from .sources import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, resolve_adapter_dir

log = logging.getLogger(__name__)

F32 = np.float32
PEFT_PREFIX = "base_model.model."
# Multimodal checkpoints nest the text model; their adapters name it so (see loading/safetensors.py).
_NESTED_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head", "lm_head"))

# adapter_config.json options whose forward pass a merged weight cannot reproduce -> what they are.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales every output column by a learned magnitude",
    "use_qalora": "QA-LoRA feeds the adapter group-pooled inputs",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "kasa_config": "KaSA rewrites the base weight's singular values",
    "monteclora_config": "MonteCLoRA samples its adapter weights",
    "arrow_config": "Arrow routes each token between several adapters",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "target_parameters": "LoRA on raw parameters (such as MoE expert tensors)",
    "layer_replication": "layer replication duplicates base layers",
    "trainable_token_indices": "trainable tokens change rows of the embedding table",
    "megatron_config": "Megatron-parallel LoRA layers",
}
# A fused projection and the separate ones whose output rows it stacks, in order.
FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


class AdapterMismatchError(ModelLoadError):
    """A LoRA adapter does not fit the base model (a module it targets is missing or has another shape)."""


# --------------------------------------------------------------------------- one adapter


@dataclass
class LoraFactors:
    """One module's low-rank update: delta = scale * B @ A (+ scale * bias_b on the bias)."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scale: float
    bias_b: np.ndarray | None = None  # lora_B.bias [out], with `lora_bias`


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk, keyed by the base model's HF module names."""

    name: str  # what the user gave (directory or repo id)
    path: str  # its local directory
    weight: float
    config: dict[str, Any]
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # full replacement weights [out, in]
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # replacement biases [out]

    @property
    def modules(self) -> list[str]:
        return sorted({*self.factors, *self.weights, *self.biases})

    def scales(self) -> list[float]:
        return sorted({round(f.scale, 6) for f in self.factors.values()})


def _read_config(path: str, name: str) -> dict[str, Any]:
    config = read_json_object(os.path.join(path, CONFIG_FILE))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        hint = " (an X-LoRA model is served with x-lora -x / LLM(xlora_model_id=...))" if peft_type == "XLORA" else ""
        raise NotSupportedError(f"LoRA adapter {name}: {CONFIG_FILE} has peft_type {peft_type!r}; only LoRA adapters "
                                f"are supported{hint}")
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise NotSupportedError(f"LoRA adapter {name}: {CONFIG_FILE} sets {key}={config[key]!r}, which is not "
                                    f"supported ({what}, which a merged weight cannot reproduce)")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise NotSupportedError(f"LoRA adapter {name}: {CONFIG_FILE} has bias={config['bias']!r}; expected none, all "
                                "or lora_only")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ModelLoadError(f"LoRA adapter {name}: {CONFIG_FILE} needs a positive number for {key!r}, "
                                 f"got {value!r}")
    if config.get("fan_in_fan_out"):
        # PEFT itself turns it off for torch.nn.Linear targets, which every supported family's projections are.
        log.warning("LoRA adapter %s: fan_in_fan_out=true is ignored, as PEFT ignores it for nn.Linear layers", name)
    return config


def _read_tensors(path: str, name: str) -> dict[str, np.ndarray]:
    """Every tensor of the adapter as f32 numpy."""
    from ..safetensors import SafetensorsFile

    file = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(file):
        handle = SafetensorsFile(file)
        try:
            return {key: np.array(handle.tensor(key), dtype=F32) for key in handle.keys()}
        finally:
            handle.close()
    file = os.path.join(path, BIN_FILE)
    try:
        import torch
    except ImportError:
        raise NotSupportedError(f"LoRA adapter {name}: {file} is a PyTorch pickle and torch is not installed; convert "
                                f"it to {SAFETENSORS_FILE} (PEFT: save_pretrained(safe_serialization=True))") from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {key: value.detach().float().numpy() for key, value in state.items()}


def _module_key(key: str) -> str:
    """A saved key without PEFT's wrapper prefix, with a nested text model named as the builders name it."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    for nested, plain in _NESTED_PREFIXES:
        if key.startswith(nested):
            return plain + key[len(nested):]
    return key


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching a dotted suffix of `module`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _layer_index(module: str, layers_pattern) -> int | None:
    """The first layer number in `module` (after `layers_pattern` when the config names one)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.search(r"\.[^.]*\.(\d+)\.", module)
    else:
        match = next(filter(None, (re.search(rf"(?:^|\.){p}\.(\d+)\.", module) for p in patterns)), None)
    return int(match.group(1)) if match else None


def is_targeted(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT, loading this config, puts a LoRA layer on `module` (target_modules,
    exclude_modules, modules_to_save, layers_to_transform/layers_pattern)."""

    def listed(names, key: str) -> bool:
        if isinstance(names, str):
            return re.fullmatch(names, key) is not None
        return any(key == n or key.endswith("." + n) for n in names or [])

    if config.get("exclude_modules") and listed(config["exclude_modules"], module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT filled it from its per-architecture defaults; the saved tensors are what was targeted
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return module != "lm_head"
        return re.fullmatch(targets, module) is not None
    if not listed(targets, module):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def load_adapter(spec: str, weight: float = 1.0, token_source: str = "cache") -> LoraAdapter:
    """Read (downloading if needed) the PEFT LoRA adapter `spec` and check what it holds."""
    path = resolve_adapter_dir(spec, token_source)
    config = _read_config(path, spec)
    adapter = LoraAdapter(spec, path, float(weight), config)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in _read_tensors(path, spec).items():
        module_key = _module_key(key)
        for suffix, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_B.bias", "bias_b")):
            if module_key.endswith(suffix):
                pairs.setdefault(module_key[: -len(suffix)], {})[part] = value
                break
        else:
            if ".lora_embedding_" in module_key:
                raise NotSupportedError(f"LoRA adapter {spec}: {key} is a LoRA on an embedding table, which is not "
                                        "supported (only linear projections can be adapted)")
            if module_key.endswith((".weight", ".bias")) and ".lora_" not in module_key:
                module, _, kind = module_key.rpartition(".")
                module = module.removesuffix(".base_layer")
                target = adapter.weights if kind == "weight" else adapter.biases
                if value.ndim != (2 if kind == "weight" else 1):
                    raise NotSupportedError(
                        f"LoRA adapter {spec}: {key} ({list(value.shape)}) replaces {module}, which is not a linear "
                        "projection; only projections' weights and biases can be replaced (modules_to_save / bias)")
                target[module] = value
                continue
            raise NotSupportedError(f"LoRA adapter {spec}: tensor {key} is not a LoRA weight this engine can merge "
                                    "(expected ...lora_A.weight, ...lora_B.weight, ...lora_B.bias, or a projection's "
                                    "full weight/bias)")
    ignored = []
    for module, parts in sorted(pairs.items()):
        if "a" not in parts or "b" not in parts:
            raise ModelLoadError(f"LoRA adapter {spec}: {module} has {' and '.join(sorted(parts))} but not both "
                                 "lora_A.weight and lora_B.weight; the adapter file is incomplete")
        if not is_targeted(config, module):
            ignored.append(module)
            continue
        a, b = parts["a"], parts["b"]
        rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ModelLoadError(f"LoRA adapter {spec}: {module} has lora_A {list(a.shape)} and lora_B "
                                 f"{list(b.shape)}, which do not fit rank r={rank} from {CONFIG_FILE}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.factors[module] = LoraFactors(a, b, scale, parts.get("bias_b"))
    if ignored:
        log.warning("LoRA adapter %s: %d saved module(s) are not targeted by its %s and are skipped, as PEFT skips "
                    "them: %s", spec, len(ignored), CONFIG_FILE, ", ".join(ignored))
    if not adapter.modules:
        raise ModelLoadError(f"LoRA adapter {spec}: it holds no LoRA weights for any targeted module")
    return adapter


# --------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class _Contribution:
    """Adapter `adapter`'s module `module` adds to rows `rows` of a target tensor (None: all of it),
    taking rows `source_rows` of its own delta (None: all of them)."""

    adapter: LoraAdapter
    module: str
    rows: slice | None = None
    source_rows: slice | None = None


class _MergedSource:
    """A weight source seen by the wrapped factory for one merged tensor: the merged weight is
    dense f32, so it reports F32 for that tensor and the factory takes its dequantize path."""

    def __init__(self, source, merged_name: str):
        self._source = source
        self._merged_name = merged_name

    def tensor(self, name: str):
        tensor = self._source.tensor(name)
        if name == self._merged_name and isinstance(getattr(tensor, "qtype", None), str):
            return dataclasses.replace(tensor, qtype="F32")
        return tensor

    def __getattr__(self, attr: str):
        return getattr(self._source, attr)


class LoraMerger:
    """Adds the deltas of a list of adapters to the projections a model builder creates.

    `wrap(make_linear, config)` returns the hook to build with; `finish()` afterwards checks that
    every targeted module was merged and logs a summary.
    """

    def __init__(self, adapters: list[LoraAdapter]):
        self.adapters = adapters
        self._plan: dict[str, list[_Contribution]] | None = None  # tensor name -> contributions
        self._merged: set[str] = set()
        self._shapes: dict[str, tuple[int, int]] = {}  # tensor name -> its [out, in]
        self._config = None

    @classmethod
    def load(cls, specs: list[str], weights: list[float] | None = None, token_source: str = "cache") -> "LoraMerger":
        if isinstance(specs, str):
            specs = [specs]
        weights = [1.0] * len(specs) if weights is None else list(weights)
        if len(weights) != len(specs):
            raise InvalidRequestError(f"got {len(weights)} LoRA weights for {len(specs)} adapters",
                                      param="lora_weights")
        return cls([load_adapter(spec, weight, token_source) for spec, weight in zip(specs, weights)])

    def fingerprint(self) -> str:
        """Identifies the merged result (adapter files and weights), for caches keyed on the weights."""
        digest = hashlib.sha256()
        for adapter in self.adapters:
            for file in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE):
                full = os.path.join(adapter.path, file)
                if os.path.isfile(full):
                    stat = os.stat(full)
                    digest.update(f"{full}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
            digest.update(f"{adapter.weight!r};".encode())
        return digest.hexdigest()[:32]

    # -- the hook ------------------------------------------------------------------------

    def wrap(self, make_linear: Callable, config) -> Callable:
        """`make_linear(source, name, row_transform=None, bias=None)` that merges the adapters."""
        self._config = config

        def merged_make_linear(source, name: str, row_transform: Callable | None = None,
                               bias: np.ndarray | None = None):
            if self._plan is None:
                self._plan = self._make_plan(source)  # first projection: check every target before any work
            contributions = self._plan.get(name)
            if not contributions:
                return make_linear(source, name, row_transform, bias=bias)
            self._merged.add(name)
            bias = self._merged_bias(name, contributions, bias)

            def transform(weight: np.ndarray) -> np.ndarray:
                if row_transform is not None:
                    weight = row_transform(weight)
                return self._merged_weight(name, contributions, weight)

            return make_linear(_MergedSource(source, name), name, transform, bias=bias)

        return merged_make_linear

    def _merged_weight(self, name: str, contributions: list[_Contribution], weight: np.ndarray) -> np.ndarray:
        """weight [out, in] (HF orientation) with the contributions merged, as a new f32 array."""
        replacements = [c for c in contributions if c.module in c.adapter.weights]
        if replacements:
            weight = replacements[-1].adapter.weights[replacements[-1].module]
        merged = np.array(weight, dtype=F32)  # a copy: the source may be a read-only memory map
        for c in contributions:
            factors = c.adapter.factors.get(c.module)
            if factors is None:
                continue
            b = factors.b if c.source_rows is None else factors.b[c.source_rows]
            delta = (c.adapter.weight * factors.scale) * (b @ factors.a)
            if c.rows is None:
                merged += delta
            else:
                merged[c.rows] += delta
        return merged

    def _merged_bias(self, name: str, contributions: list[_Contribution], bias: np.ndarray | None):
        for c in contributions:
            if c.module in c.adapter.biases:
                bias = np.array(c.adapter.biases[c.module], dtype=F32)
        for c in contributions:
            factors = c.adapter.factors.get(c.module)
            if factors is None or factors.bias_b is None:
                continue
            bias_b = factors.bias_b if c.source_rows is None else factors.bias_b[c.source_rows]
            # PEFT's forward adds lora_B's bias even where the base layer has none (it only refuses to merge
            # it there); a Linear holds a bias of its own, so one is made.
            bias = np.zeros(self._shapes[name][0], dtype=F32) if bias is None else np.array(bias, dtype=F32)
            bias[c.rows if c.rows is not None else slice(None)] += c.adapter.weight * factors.scale * bias_b
        return bias

    # -- planning --------------------------------------------------------------------------

    def _tensor_name(self, source, module: str) -> str | None:
        """The name `source` stores `module`'s weight under, or None when it has none."""
        if hasattr(source, "has"):  # a Hugging Face checkpoint (WeightSource): HF names
            return module + ".weight" if source.has(module + ".weight") else None
        gguf_module = gguf_module_name(module, self._config.arch)
        return gguf_module + ".weight" if gguf_module and gguf_module + ".weight" in source else None

    def _fused_rows(self, fused: str, rows: int) -> list[int]:
        cfg = self._config
        if fused == "self_attn.qkv_proj":
            return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        return [rows // 2, rows // 2]

    def _place(self, source, adapter: LoraAdapter, module: str) -> list[tuple[str, _Contribution]]:
        """Where `module` of `adapter` goes in this checkpoint: [(tensor name, contribution)]."""
        name = self._tensor_name(source, module)
        if name is not None:
            return [(name, _Contribution(adapter, module))]
        prefix, _, inner = module.rpartition(".layers.")
        index, _, inner = inner.partition(".")
        layer = f"{prefix}.layers.{index}." if prefix else ""
        if not layer or module in adapter.weights or module in adapter.biases:
            return []  # whole-module replacements only go to a tensor of their own
        factors = adapter.factors[module]
        for fused, parts in FUSED_PROJECTIONS.items():
            if inner in parts:  # separate in the adapter, fused here
                name = self._tensor_name(source, layer + fused)
                if name is not None:
                    sizes = self._fused_rows(fused, int(source.tensor(name).shape[0]))
                    part = parts.index(inner)
                    start = sum(sizes[:part])
                    return [(name, _Contribution(adapter, module, rows=slice(start, start + sizes[part])))]
            if inner == fused:  # fused in the adapter, separate here
                names = [self._tensor_name(source, layer + part) for part in parts]
                if all(names):
                    sizes = [int(source.tensor(n).shape[0]) for n in names]
                    if sum(sizes) != factors.b.shape[0]:
                        raise AdapterMismatchError(
                            f"LoRA adapter {adapter.name}: {module} updates {factors.b.shape[0]} rows, but the model's "
                            f"separate {', '.join(names)} have {' + '.join(map(str, sizes))} rows")
                    starts = np.cumsum([0, *sizes])
                    return [(n, _Contribution(adapter, module, source_rows=slice(int(s), int(s) + size)))
                            for n, s, size in zip(names, starts, sizes)]
        return []

    def _make_plan(self, source) -> dict[str, list[_Contribution]]:
        plan: dict[str, list[_Contribution]] = {}
        for adapter in self.adapters:
            for module in adapter.modules:
                placed = self._place(source, adapter, module)
                if not placed:
                    base = adapter.config.get("base_model_name_or_path")
                    raise AdapterMismatchError(
                        f"LoRA adapter {adapter.name}: it targets {module}, which this model does not have "
                        f"({self._config.arch} architecture, {self._config.num_layers} layers"
                        f"{', lm_head tied to the embeddings' if module == 'lm_head' else ''}); the adapter was "
                        f"trained for {base or 'another base model'}")
                for name, contribution in placed:
                    self._shapes[name] = tuple(int(d) for d in source.tensor(name).shape)
                    self._check_shape(name, contribution)
                    plan.setdefault(name, []).append(contribution)
        for name, contributions in plan.items():
            replacing = [c.adapter.name for c in contributions if c.module in c.adapter.weights]
            if len(replacing) > 1:
                raise InvalidRequestError(f"LoRA adapters {', '.join(replacing)} each replace the whole weight {name}; "
                                          "only one adapter may replace a module", param="lora_adapters")
        return plan

    def _check_shape(self, name: str, c: _Contribution) -> None:
        out_rows, in_cols = self._shapes[name]
        rows = c.rows.stop - c.rows.start if c.rows else out_rows
        problems = []
        factors = c.adapter.factors.get(c.module)
        if factors is not None:
            delta_rows = c.source_rows.stop - c.source_rows.start if c.source_rows else factors.b.shape[0]
            if (delta_rows, factors.a.shape[1]) != (rows, in_cols):
                problems.append(f"lora_B {list(factors.b.shape)} @ lora_A {list(factors.a.shape)}")
            if factors.bias_b is not None and factors.bias_b.shape != (factors.b.shape[0],):
                problems.append(f"lora_B.bias {list(factors.bias_b.shape)}")
        weight = c.adapter.weights.get(c.module)
        if weight is not None and tuple(weight.shape) != (rows, in_cols):
            problems.append(f"a full weight {list(weight.shape)}")
        bias = c.adapter.biases.get(c.module)
        if bias is not None and bias.shape != (rows,):
            problems.append(f"a bias {list(bias.shape)}")
        if problems:
            where = f" (rows {c.rows.start}:{c.rows.stop} of it)" if c.rows else ""
            raise AdapterMismatchError(
                f"LoRA adapter {c.adapter.name}: {c.module} has {' and '.join(problems)}, but the model's "
                f"{name}{where} is [{rows}, {in_cols}]; the adapter was trained for "
                f"{c.adapter.config.get('base_model_name_or_path') or 'another base model'}")

    # -- after building ----------------------------------------------------------------------

    def finish(self) -> None:
        """Check every planned tensor was built through the hook, and log what was merged."""
        if self._plan is None:
            raise AdapterMismatchError("LoRA adapters were given but the model built no projection to merge them into")
        missed = sorted(set(self._plan) - self._merged)
        if missed:
            owners = sorted({c.adapter.name for name in missed for c in self._plan[name]})
            raise NotSupportedError(f"LoRA adapter(s) {', '.join(owners)} target {', '.join(missed)}, which this model "
                                    "does not build as a plain projection (e.g. MoE expert weights); those cannot be "
                                    "adapted")
        parts = [f"{a.name} (weight {a.weight:g}, {len(a.modules)} modules, scale "
                 f"{'/'.join(f'{s:g}' for s in a.scales()) or '-'})" for a in self.adapters]
        log.info("LoRA: merged %d adapter(s) into %d projections: %s", len(self.adapters), len(self._merged),
                 "; ".join(parts))

    def summary(self) -> dict[str, Any]:
        return {"adapters": [a.name for a in self.adapters], "weights": [a.weight for a in self.adapters],
                "merged_tensors": sorted(self._merged)}
