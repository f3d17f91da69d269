"""X-LoRA checkpoints: the configuration, the adapters' order, the classifier, and the stacks on the base model.

An X-LoRA model (arXiv:2402.07148) holds several LoRA adapters unmerged plus a small classifier
that reads the base model's last hidden state and gives every token one weight per adapter
(per adapted projection with `layerwise_scalings`); models/xlora.py runs it. `-x` names either

- PEFT's layout (`XLoraModel.save_pretrained`): `adapter_config.json` with `peft_type: XLORA`,
  the classifier in `adapter_model.safetensors` (keys `...internal_xlora_classifier.layers.J.*`,
  a ReLU after every layer but the last), each adapter in a sub-folder named by its index
  (`0`, `1`, ...) or by its name; or
- mistral.rs' layout (e.g. lamm-mit/x-lora): `xlora_config.json`, `xlora_classifier.safetensors`
  (keys `inner.J.*` and `last.*`, ReLU only with `enable_relu_and_dropout`), one sub-folder per
  adapter named as the config / ordering file lists it;

as a local directory, a Hub repo id, or the path of the config JSON itself. The classifier's
class i is adapter i of the config's `adapters` (a dict or a list, in order). The ordering
file (`-o`, mistral.rs' format) may list the adapters (`order`, which must then be the config's
names in the config's order) and the projections' scaling indices (`layers`: module -> index);
without `layers` the indices are PEFT's: adapted projections in the order the model registers
them (layer by layer; q, k, v, o, then gate, up, down; lm_head last).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, NotSupportedError
from ...json_files import read_json_object
from .lora import AdapterMismatchError, LoraAdapter, LoraMerger, load_adapter

log = logging.getLogger(__name__)

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MISTRALRS_CONFIG, MISTRALRS_CLASSIFIER = "xlora_config.json", "xlora_classifier.safetensors"
# Where a decoder layer's projections come in the order transformers registers them (PEFT's indices).
REGISTRATION_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj",
                      "self_attn.o_proj", "self_attn.dense", "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj",
                      "mlp.down_proj", "mlp.fc1", "mlp.fc2", "mlp.c_fc", "mlp.c_proj")


@dataclass
class XLoraOptions:
    """The classifier's options (PEFT's XLoraConfig names)."""

    n_adapters: int
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    relu_between: bool = True  # PEFT: always; mistral.rs' format: enable_relu_and_dropout


@dataclass
class XLoraCheckpoint:
    """Everything read from disk before the base model is built."""

    config_path: str
    classifier_path: str
    options: XLoraOptions
    adapter_names: list[str]
    adapters: list[LoraAdapter]
    classifier: list[tuple[np.ndarray, np.ndarray | None]]  # dense layers (weight [out, in], bias [out])
    module_index: dict[str, int] = field(default_factory=dict)  # adapted HF module -> its scalings index
    base_model_id: str | None = None

    @property
    def num_modules(self) -> int:
        return len(self.module_index)


# --------------------------------------------------------------------------- finding the files


def _download(repo_id: str, token_source: str) -> str:
    from huggingface_hub import snapshot_download

    from ..hub import fetch_from_hub

    return fetch_from_hub(repo_id, f"the X-LoRA model {repo_id}", token_source,
                          lambda **hub: snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors",
                                                                                 "*/adapter_model.bin"], **hub))


def resolve_xlora_dir(model_id: str, token_source: str = "cache") -> tuple[str, str]:
    """(directory, config file) of `-x MODEL_ID`: a directory, a config JSON, or a Hub repo id."""
    local = os.path.expanduser(model_id)
    if os.path.isfile(local):
        return os.path.dirname(os.path.abspath(local)), os.path.abspath(local)
    if os.path.isdir(local):
        directory = os.path.abspath(local)
    else:
        from ..hub import looks_local

        if model_id.count("/") != 1 or looks_local(model_id) or model_id.startswith("."):
            raise ModelNotFoundError(f"X-LoRA model not found: {model_id} (no such file or directory, and not a "
                                     "Hugging Face repo id such as owner/name)")
        directory = _download(model_id, token_source)
    for name in (MISTRALRS_CONFIG, PEFT_CONFIG):
        if os.path.isfile(os.path.join(directory, name)):
            return directory, os.path.join(directory, name)
    raise ModelNotFoundError(f"X-LoRA model {model_id}: {directory} has neither {MISTRALRS_CONFIG} nor {PEFT_CONFIG}")


def _adapter_dir(directory: str, name: str, index: int, listed: str | None) -> str:
    for candidate in (os.path.join(directory, name), os.path.join(directory, str(index)), listed):
        if candidate and os.path.isfile(os.path.join(os.path.expanduser(candidate), PEFT_CONFIG)):
            return os.path.expanduser(candidate)
    raise ModelNotFoundError(f"X-LoRA adapter {name!r} (class {index}): no LoRA adapter in {directory}/{name}, "
                             f"{directory}/{index}" + (f" or {listed}" if listed else ""))


# --------------------------------------------------------------------------- config and ordering


def _options(config: dict[str, Any], path: str, n_adapters: int, mistralrs: bool) -> XLoraOptions:
    def number(key, default, kind=float):
        value = config.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"X-LoRA config {path}: {key} must be a number, got {value!r}", param=key)
        return kind(value)

    top_k = number("top_k_lora", None, int)
    if top_k is not None and not 1 <= top_k <= n_adapters:
        raise InvalidRequestError(f"X-LoRA config {path}: top_k_lora={top_k} is outside 1..{n_adapters} "
                                  f"(the number of adapters)", param="top_k_lora")
    temperature = number("softmax_temperature", 1.0)
    if temperature <= 0:
        raise InvalidRequestError(f"X-LoRA config {path}: softmax_temperature must be > 0, got {temperature}",
                                  param="softmax_temperature")
    return XLoraOptions(
        n_adapters=n_adapters, layerwise_scalings=bool(config.get("layerwise_scalings", False)),
        enable_softmax=bool(config.get("enable_softmax", True)), softmax_temperature=temperature,
        top_k_lora=top_k, enable_softmax_topk=bool(config.get("enable_softmax_topk", False)),
        scaling_pass_value=number("scaling_pass_value", 0.0),
        global_scaling_weight=number("global_scaling_weight", 1.0),
        relu_between=bool(config.get("enable_relu_and_dropout", False)) if mistralrs else True)


def _adapter_names(config: dict[str, Any], path: str) -> tuple[list[str], dict[str, str]]:
    adapters = config.get("adapters")
    if isinstance(adapters, dict) and all(isinstance(v, str) for v in adapters.values()):
        return list(adapters), dict(adapters)
    if isinstance(adapters, list) and all(isinstance(v, str) for v in adapters):
        return list(adapters), {}
    if adapters in (None, [], {}):
        return [], {}
    raise InvalidRequestError(f"X-LoRA config {path}: \"adapters\" must be a list of names or a name -> path object, "
                              f"got {adapters!r}", param="xlora_model_id")


def read_xlora_ordering(path: str) -> dict[str, Any]:
    """mistral.rs' ordering file: {"order": [names], "layers": {module: index}, "base_model_id": ...}."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ModelNotFoundError(f"ordering file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"ordering file {path} is not readable JSON ({exc})", param="order") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError(f"ordering file {path} must hold a JSON object", param="order")
    order, layers = data.get("order"), data.get("layers")
    if order is not None and not (isinstance(order, list) and all(isinstance(n, str) for n in order)):
        raise InvalidRequestError(f"ordering file {path}: \"order\" must be a list of adapter names", param="order")
    if layers is not None and not (isinstance(layers, dict) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers.values())):
        raise InvalidRequestError(f"ordering file {path}: \"layers\" must map module names to integer indices",
                                  param="order")
    return data


def _module_sort_key(module: str) -> tuple:
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
    if match:
        inner = match.group(2)
        rank = REGISTRATION_ORDER.index(inner) if inner in REGISTRATION_ORDER else len(REGISTRATION_ORDER)
        return (0, int(match.group(1)), rank, inner)
    return (1 if module != "lm_head" else 2, 0, 0, module)


def peft_module_order(modules) -> dict[str, int]:
    """PEFT's scalings index of each adapted projection (see the module docstring)."""
    return {module: i for i, module in enumerate(sorted(set(modules), key=_module_sort_key))}


def _check_ordering_layers(layers: dict[str, int], modules: set[str], path: str) -> dict[str, int]:
    missing, extra = sorted(modules - set(layers)), sorted(set(layers) - modules)
    if missing or extra:
        raise AdapterMismatchError(
            f"ordering file {path}: its \"layers\" do not match the adapters' projections"
            + (f"; adapted but not listed: {', '.join(missing[:5])}" if missing else "")
            + (f"; listed but no adapter targets them: {', '.join(extra[:5])}" if extra else ""))
    if sorted(layers.values()) != list(range(len(layers))):
        raise AdapterMismatchError(f"ordering file {path}: \"layers\" indices must be 0..{len(layers) - 1}, each once")
    return dict(layers)


# --------------------------------------------------------------------------- the classifier


def _peft_linear_indices(config: dict[str, Any]) -> list[int]:
    """Where PEFT's classifier Sequential holds its Linear layers (Linear, ReLU[, Dropout], Linear, ...)."""
    depth = config.get("xlora_depth", 1)
    step = 3 if (config.get("xlora_dropout_p", 0.2) or 0) > 0 else 2
    return [0] if not isinstance(depth, int) or depth <= 1 else [i * step for i in range(depth)]


def _read_classifier(path: str, peft_layout: bool, config: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    from ..safetensors import SafetensorsFile

    if not os.path.isfile(path):
        raise ModelNotFoundError(f"X-LoRA classifier not found: {path}")
    handle = SafetensorsFile(path)
    try:
        tensors = {key: np.array(handle.tensor(key), dtype=np.float32) for key in handle.keys()}
    finally:
        handle.close()
    layers: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = (re.search(r"internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)$", key) if peft_layout
                 else re.fullmatch(r"(?:inner\.(\d+)|(last))\.(weight|bias)", key))
        if match is None:
            raise ModelLoadError(f"X-LoRA classifier {path}: unexpected tensor {key}")
        if peft_layout:
            position, kind = (0, int(match.group(1))), match.group(2)
        else:
            position = (1, 0) if match.group(2) else (0, int(match.group(1)))
            kind = match.group(3)
        layers.setdefault(position, {})[kind] = value
    if peft_layout and sorted(i for _, i in layers) != _peft_linear_indices(config):
        raise ModelLoadError(
            f"X-LoRA classifier {path} holds layers {sorted(i for _, i in layers)} of PEFT's classifier, but xlora_depth "
            f"{config.get('xlora_depth', 1)} puts its Linear layers at {_peft_linear_indices(config)}; PEFT's "
            "save_pretrained drops the layers whose index equals an adapter name (0, 1, ...): save the classifier's "
            "state_dict yourself")
    out = []
    for position in sorted(layers):
        parts = layers[position]
        weight, bias = parts.get("weight"), parts.get("bias")
        if weight is None or weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
            raise ModelLoadError(f"X-LoRA classifier {path}: layer {position[1]} has weight "
                                 f"{None if weight is None else list(weight.shape)} and bias "
                                 f"{None if bias is None else list(bias.shape)}")
        out.append((weight, bias))
    if not out:
        raise ModelLoadError(f"X-LoRA classifier {path} holds no layers")
    for (w0, _), (w1, _) in zip(out, out[1:]):
        if w1.shape[1] != w0.shape[0]:
            raise ModelLoadError(f"X-LoRA classifier {path}: a layer of {w0.shape[0]} outputs feeds one of "
                                 f"{w1.shape[1]} inputs")
    return out


def check_classifier(ckpt: XLoraCheckpoint, hidden_size: int) -> None:
    """The classifier must read the base model's hidden state and give one weight per adapter (per projection)."""
    first, last = ckpt.classifier[0][0], ckpt.classifier[-1][0]
    per_module = ckpt.options.layerwise_scalings
    want = ckpt.options.n_adapters * (ckpt.num_modules if per_module else 1)
    problems = []
    if first.shape[1] != hidden_size:
        problems.append(f"it reads {first.shape[1]} features but the base model's hidden size is {hidden_size}")
    if last.shape[0] != want:
        problems.append(f"it gives {last.shape[0]} outputs but {ckpt.options.n_adapters} adapters"
                        + (f" x {ckpt.num_modules} adapted projections" if per_module else "") + f" need {want}")
    if problems:
        raise AdapterMismatchError(f"X-LoRA classifier {ckpt.classifier_path} does not fit the base model: "
                                   + "; ".join(problems))


# --------------------------------------------------------------------------- reading everything


def check_xlora_request(model_id: str | None, order: str | None, tgt_non_granular_index: int | None) -> None:
    """The X-LoRA settings make sense together (checked before anything loads)."""
    if model_id is None and (order is not None or tgt_non_granular_index is not None):
        raise InvalidRequestError("an X-LoRA ordering file or --tgt-non-granular-index was given without an X-LoRA "
                                  "model (-x / xlora_model_id)", param="xlora_model_id")
    if tgt_non_granular_index is not None and (isinstance(tgt_non_granular_index, bool) or not isinstance(
            tgt_non_granular_index, int) or tgt_non_granular_index < 1):
        raise InvalidRequestError(f"--tgt-non-granular-index must be a position of at least 1, got "
                                  f"{tgt_non_granular_index!r}", param="tgt_non_granular_index")


def load_xlora(model_id: str, order: str | None = None, token_source: str = "cache") -> XLoraCheckpoint:
    """Read and check an X-LoRA model's config, adapters, ordering and classifier (see the module docstring)."""
    directory, config_path = resolve_xlora_dir(model_id, token_source)
    config = read_json_object(config_path)
    # mistral.rs' config has no peft_type (and with -x FILE it may be named anything)
    peft_layout = "peft_type" in config and os.path.basename(config_path) != MISTRALRS_CONFIG
    if peft_layout and str(config.get("peft_type", "")).upper() != "XLORA":
        raise InvalidRequestError(f"X-LoRA model {model_id}: {config_path} has peft_type "
                                  f"{config.get('peft_type')!r}, not XLORA (a plain LoRA adapter is loaded with "
                                  "lora / -a)", param="xlora_model_id")
    names, listed = _adapter_names(config, config_path)
    ordering = read_xlora_ordering(order) if order else {}
    ordered = ordering.get("order")
    if ordered is not None and names and ordered != names:
        raise AdapterMismatchError(f"ordering file {order}: \"order\" lists {ordered}, but the X-LoRA config "
                                   f"{config_path} was trained with the adapters {names} (same names, same order)")
    names = names or list(ordered or [])
    if not names:
        raise InvalidRequestError(f"X-LoRA model {model_id}: neither {config_path} nor an ordering file (-o) lists "
                                  "the adapters", param="order")
    classifier_path = os.path.join(directory, PEFT_WEIGHTS if peft_layout else MISTRALRS_CLASSIFIER)
    classifier = _read_classifier(classifier_path, peft_layout, config)
    adapters = []
    for i, name in enumerate(names):
        adapter = load_adapter(_adapter_dir(directory, name, i, listed.get(name)), token_source=token_source)
        if adapter.weights or adapter.biases or any(f.bias_b is not None for f in adapter.factors.values()):
            raise NotSupportedError(f"X-LoRA adapter {name}: it replaces weights or biases (modules_to_save / bias / "
                                    "lora_bias), which X-LoRA does not mix")
        adapters.append(adapter)
    modules = {module for adapter in adapters for module in adapter.factors}
    module_index = (_check_ordering_layers(ordering["layers"], modules, order) if ordering.get("layers")
                    else peft_module_order(modules))
    base = ordering.get("base_model_id") or config.get("base_model_id") or config.get("base_model_name_or_path")
    ckpt = XLoraCheckpoint(config_path, classifier_path, _options(config, config_path, len(names), not peft_layout),
                           names, adapters, classifier, module_index,
                           base if isinstance(base, str) and base else None)
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and hidden != ckpt.classifier[0][0].shape[1]:
        raise AdapterMismatchError(f"X-LoRA classifier {classifier_path} reads {ckpt.classifier[0][0].shape[1]} "
                                   f"features, but {config_path} says hidden_size {hidden}")
    log.info("X-LoRA %s: %d adapters (%s), %d adapted projections, classifier of %d layer(s)%s", model_id,
             len(names), ", ".join(names), len(module_index), len(ckpt.classifier),
             ", layerwise" if ckpt.options.layerwise_scalings else "")
    return ckpt


def xlora_base_model(model_id: str, order: str | None = None, token_source: str = "cache") -> str:
    """The base model an X-LoRA model names (ordering file's base_model_id, else its config's), for `x-lora` without -m."""
    base = read_xlora_ordering(order).get("base_model_id") if order else None
    if not base:
        config = read_json_object(resolve_xlora_dir(model_id, token_source)[1])
        base = config.get("base_model_id") or config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidRequestError(f"X-LoRA model {model_id} does not name its base model (no base_model_id in the "
                                  "ordering file or the X-LoRA config); give it with -m/--model-id", param="model_id")
    return base


# --------------------------------------------------------------------------- stacks on the model


class XLoraAttacher:
    """Wraps the model builders' `make_linear` hook to remember each projection it builds, then
    gives every adapted one an `XLoraStack` (models/xlora.py) holding all the adapters."""

    def __init__(self, ckpt: XLoraCheckpoint):
        self.ckpt = ckpt
        self._merger = LoraMerger(ckpt.adapters)  # reused for its placement of modules in this checkpoint
        self._plan = None
        self._built: dict[str, Any] = {}

    def wrap(self, make_linear: Callable, config) -> Callable:
        self._merger._config = config

        def recording_make_linear(source, name: str, row_transform: Callable | None = None, bias=None):
            if self._plan is None:
                self._plan = self._merger._make_plan(source)
            linear = make_linear(source, name, row_transform, bias=bias)
            if name in self._plan:
                self._built[name] = linear
            return linear

        return recording_make_linear

    def attach(self) -> int:
        """Put the stacks on the built projections; returns how many projections carry one."""
        from ...models.xlora import XLoraStack

        plan = self._plan or {}
        missed = sorted(set(plan) - set(self._built))
        if missed or not plan:
            raise NotSupportedError(f"X-LoRA adapters target {', '.join(missed) or 'nothing this model builds'}, which "
                                    "this model does not build as a plain projection")
        n = len(self.ckpt.adapters)
        slot_of = {id(adapter): i for i, adapter in enumerate(self.ckpt.adapters)}
        for name, contributions in plan.items():
            linear = self._built[name]
            indices = {self.ckpt.module_index[c.module] for c in contributions}
            if len(indices) > 1 and self.ckpt.options.layerwise_scalings:
                raise NotSupportedError(f"X-LoRA with layerwise_scalings on {name}: this checkpoint fuses projections "
                                        "the adapters scale separately; use a checkpoint with separate projections")
            per_adapter: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
            out_features = linear.out_features
            for c in contributions:
                factors = c.adapter.factors[c.module]
                b = factors.b if c.source_rows is None else factors.b[c.source_rows]
                full_b = np.zeros((out_features, b.shape[1]), np.float32)
                full_b[c.rows if c.rows is not None else slice(None)] = b * factors.scale
                per_adapter[slot_of[id(c.adapter)]].append((factors.a.T, full_b.T))
            rank = max(sum(a.shape[1] for a, _ in parts) for parts in per_adapter)
            stack = XLoraStack(linear.in_features, out_features, n, rank, index=min(indices))
            for slot, parts in enumerate(per_adapter):
                if parts:
                    stack.set_slot(slot, np.concatenate([a for a, _ in parts], axis=1),
                                   np.concatenate([b for _, b in parts], axis=0))
            stack.attach_to(linear)
        return len(plan)


def build_xlora_model(base, ckpt: XLoraCheckpoint, attacher: XLoraAttacher, config,
                      tgt_non_granular_index: int | None = None):
    """(the XLoraCausalLM around the built `base`, the config the runner sizes its KV cache by)."""
    from ...models.xlora import XLoraCausalLM, XLoraClassifier

    check_classifier(ckpt, config.hidden_size)
    attached = attacher.attach()
    opts = ckpt.options
    classifier = XLoraClassifier(ckpt.classifier, opts.n_adapters, relu_between=opts.relu_between,
                                 enable_softmax=opts.enable_softmax, temperature=opts.softmax_temperature)
    model = XLoraCausalLM(base, classifier, num_layers=config.num_layers, num_modules=ckpt.num_modules,
                          layerwise=opts.layerwise_scalings, top_k=opts.top_k_lora,
                          softmax_topk=opts.enable_softmax_topk, scaling_pass_value=opts.scaling_pass_value,
                          global_weight=opts.global_scaling_weight, lm_head_adapted="lm_head" in ckpt.module_index,
                          tgt_non_granular_index=tgt_non_granular_index, num_kv_heads=config.num_kv_heads,
                          head_dim=config.head_dim)
    log.info("X-LoRA: %d adapters on %d projections; KV cache of %d layers (scaling pass, real pass%s)",
             opts.n_adapters, attached, model.num_kv_layers,
             f", scalings fixed from position {tgt_non_granular_index}" if tgt_non_granular_index else "")
    return model, config.replace(num_layers=model.num_kv_layers)
