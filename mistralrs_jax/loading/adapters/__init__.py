"""Adapters on top of a base model: LoRA (merged at load, lora.py; sources.py finds the files),
LoRA held unmerged (unmerged.py), and X-LoRA (xlora.py), which mixes several LoRA adapters per
token with scalings from a learned classifier run on the base model's hidden states, so its
deltas cannot be merged once (models/xlora.py runs it).
"""
from .lora import AdapterMismatchError, LoraAdapter, LoraMerger, load_adapter
from .sources import adapters_from_cli, base_model_of, read_ordering_file, resolve_adapter_dir

__all__ = ["AdapterMismatchError", "LoraAdapter", "LoraMerger", "adapters_from_cli", "base_model_of",
           "load_adapter", "read_ordering_file", "resolve_adapter_dir"]
