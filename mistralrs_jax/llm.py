"""`LLM`: the offline Python API (vLLM's shape) over the engine.

`LLM(...)` loads the model (`loading.model_loader.load_model`), builds the engine
(`engine.factory.build_engine`), warms it up and starts its loop; the rest of this class
turns prompts (text, token ids, chat messages, images) into requests.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Iterator

import numpy as np

from .config import DEFAULT_MAX_SEQS, DEFAULT_SPECULATIVE_GAMMA, EngineConfig
from .engine.engine import Engine
from .engine.factory import build_engine, check_engine_config
from .errors import ImageError, InvalidRequestError, NotSupportedError
from .loading.adapters.unmerged import hold_dynamic_adapters
from .loading.chat_template import ChatTemplate
from .loading.model_loader import LoadedModel, ModelSpec, load_model
from .models.vision import SUPPORTED_VISION_ARCHS
from .outputs import RequestOutput
from .parallel.distributed import MultiHost, check_mesh_spans_processes, is_multi_process
from .parallel.distributed import attach as attach_multi_host
from .parallel.replicas import ReplicaSet, check_data_parallel, device_groups
from .parallel.mesh import host_staging
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

VISION_DRAFT_REFUSED = "speculative decoding (a draft model) is not supported for vision models yet"


def _enable_compilation_cache() -> None:
    """Persistent XLA cache so a restart does not recompile every bucket (design rule 8)."""
    import jax

    path = os.environ.get("MISTRALRS_JAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mistralrs-jax", "xla")
    try:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as exc:  # the cache is an optimisation, never a reason to fail
        log.debug("persistent compilation cache unavailable: %s", exc)


class LLM:
    def __init__(
        self,
        model: str | None = None,
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        token_source: str = "cache",
        revision: str | None = None,
        dtype: str = "auto",
        max_seqs: int = DEFAULT_MAX_SEQS,
        max_num_batched_tokens: int | None = None,
        pa_blk_size: int = 16,
        pa_ctxt_len: int | None = None,
        pa_gpu_mem: int | None = None,
        pa_gpu_mem_usage: float | None = None,
        prefix_cache_n: int = 16,
        no_paged_attn: bool = False,
        cpu_weights: str = "quantized",
        chat_template: str | None = None,
        gqa: int | None = None,
        isq: str | int | None = None,
        isq_cache: str | None = None,
        lora_adapters: list[str] | None = None,
        lora_weights: list[float] | None = None,
        max_model_len: int | None = None,
        token_buckets: list[int] | None = None,
        lora_mode: str = "merged",
        max_loras: int = 4,
        max_lora_rank: int = 16,
        xlora_model_id: str | None = None,
        xlora_order: str | None = None,
        tgt_non_granular_index: int | None = None,
        seq_buckets: list[int] | None = None,
        draft_model: str | None = None,
        draft_gguf_file: str | None = None,
        draft_isq: str | int | None = None,
        speculative_gamma: int = DEFAULT_SPECULATIVE_GAMMA,
        warmup: bool | str = True,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
    ):
        """Keywords as the mistralrs-server flags; `LLM.from_specs` takes the same as a
        `ModelSpec` (target), an `EngineConfig` and an optional draft `ModelSpec`.

        `lora_mode="dynamic"`: the `lora_adapters` are held unmerged in `max_loras` slots of rank
        up to `max_lora_rank`, each request picks one by name (`generate(..., lora=NAME)`), and
        `load_lora` / `unload_lora` change them while serving (loading/adapters/unmerged.py)."""
        if lora_mode not in ("merged", "dynamic"):
            raise InvalidRequestError(f"lora_mode must be 'merged' or 'dynamic', got {lora_mode!r}", param="lora_mode")
        self._dynamic_lora = (int(max_loras), int(max_lora_rank)) if lora_mode == "dynamic" else None
        if draft_model is None and (draft_gguf_file is not None or draft_isq is not None):
            raise NotSupportedError("draft_gguf_file / draft_isq were given without draft_model")
        engine_config = EngineConfig(
            max_seqs=max_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            pa_blk_size=pa_blk_size, pa_ctxt_len=pa_ctxt_len, pa_gpu_mem=pa_gpu_mem, pa_gpu_mem_usage=pa_gpu_mem_usage,
            prefix_cache_n=prefix_cache_n, no_paged_attn=no_paged_attn, token_buckets=token_buckets,
            seq_buckets=seq_buckets, speculative_gamma=speculative_gamma, warmup=warmup,
            tensor_parallel_size=tensor_parallel_size)
        target = ModelSpec(model=model, gguf_file=gguf_file, tokenizer=tokenizer, token_source=token_source,
                           revision=revision, dtype=dtype, cpu_weights=cpu_weights, chat_template=chat_template,
                           gqa=gqa, isq=isq, isq_cache=isq_cache, lora_adapters=lora_adapters,
                           lora_weights=lora_weights, xlora_model_id=xlora_model_id,
                           xlora_order=xlora_order, tgt_non_granular_index=tgt_non_granular_index)
        draft = None
        if draft_model is not None:
            draft = ModelSpec(model=draft_model, gguf_file=draft_gguf_file, token_source=token_source,
                              revision=revision, dtype=dtype, cpu_weights=cpu_weights, isq=draft_isq)
        self._data_parallel_size = data_parallel_size  # replicas (parallel/replicas.py), built in _start
        self._start(target, engine_config, draft)

    @classmethod
    def from_specs(cls, target: ModelSpec, engine_config: EngineConfig | None = None,
                   draft: ModelSpec | None = None) -> "LLM":
        llm = cls.__new__(cls)
        llm._start(target, engine_config or EngineConfig(), draft)
        return llm

    def _start(self, target: ModelSpec, engine_config: EngineConfig, draft: ModelSpec | None) -> None:
        _enable_compilation_cache()
        check_engine_config(engine_config, speculative=draft is not None)  # before anything loads
        if engine_config.warmup not in (True, False, "background"):
            raise NotSupportedError(f"warmup must be True, False or 'background', got {engine_config.warmup!r}")
        self.engine_config = engine_config
        self._re_isq_lock = threading.Lock()
        if draft is not None:
            target.refuse_vision = VISION_DRAFT_REFUSED
            draft.refuse_vision = VISION_DRAFT_REFUSED
        target.tensor_parallel_size = engine_config.tensor_parallel_size  # checked against the config pre-load
        if draft is not None:  # the draft is split over the same devices
            draft.tensor_parallel_size = engine_config.tensor_parallel_size
        if engine_config.tensor_parallel_size != 1:
            target.refuse_vision = "vision models are not supported with tensor_parallel_size (-tp) > 1 yet"
            if getattr(self, "_dynamic_lora", None) is not None or getattr(target, "xlora_model_id", None):
                raise NotSupportedError("per-request (dynamic) LoRA and X-LoRA adapters are not supported with "
                                        "tensor_parallel_size (-tp) > 1 yet (merged LoRA adapters are)")
        dynamic_lora = getattr(self, "_dynamic_lora", None)
        replica_groups = self._replica_groups(engine_config, draft, dynamic_lora)  # None: one engine
        lora_specs = (target.lora_adapters, target.lora_weights)
        if dynamic_lora is not None:  # held unmerged (below), not merged while loading
            self._refuse_with_dynamic_lora(engine_config, draft)
            if target.xlora_model_id is not None:
                raise NotSupportedError("lora_mode='dynamic' (per-request LoRA) and an X-LoRA model cannot be combined")
            target.lora_adapters = target.lora_weights = None
        with host_staging(engine_config.tensor_parallel_size):  # split over devices later, not whole on one
            self.loaded: LoadedModel = load_model(target)
        self.draft: LoadedModel | None = load_model(draft) if draft is not None else None
        self.isq_type: str | None = self.loaded.isq_type
        self.adapter_slots = None  # per-request LoRA's named slots (AdapterSlots)
        if dynamic_lora is not None:
            self.adapter_slots = hold_dynamic_adapters(self.loaded.model, self.loaded.config, *dynamic_lora,
                                                       *lora_specs, token_source=target.token_source)
        self.engine: Engine = build_engine(engine_config, self.loaded, self.draft) if replica_groups is None else \
            ReplicaSet([build_engine(engine_config, self.loaded, self.draft, devices=group)
                        for group in replica_groups], replica_groups)
        if self.adapter_slots is not None:
            self.engine.runner.num_lora_slots = self.adapter_slots.num_slots
            self.adapter_slots.on_change = lambda: self.engine.runner.refresh_adapter_weights(self.loaded.model)
        self.speculative_gamma = engine_config.speculative_gamma if self.draft is not None else None
        if engine_config.warmup == "background" and is_multi_process():
            # Every process compiles (and warms the sampler) in the same order, before serving.
            engine_config.warmup = True
        if engine_config.warmup:
            self._warmup(background=engine_config.warmup == "background")
        if engine_config.warmup != "background":  # else the compile thread sets it when it is done
            self.engine.metrics.compiles_at_start = self.engine.stats()["compiles"]
        # Several processes (jax.distributed): process 0's steps are broadcast to the others.
        self.distributed: MultiHost | None = attach_multi_host(self.engine.runner)
        self.engine.start()

    def _replica_groups(self, engine_config: EngineConfig, draft, dynamic_lora) -> list | None:
        """The device group of each data-parallel replica (checked before loading), None for one engine."""
        size = getattr(self, "_data_parallel_size", 1)
        check_data_parallel(size, draft is not None, dynamic_lora is not None, is_multi_process())
        check_mesh_spans_processes(engine_config.tensor_parallel_size)
        return None if size == 1 else device_groups(size, engine_config.tensor_parallel_size)

    def _refuse_with_dynamic_lora(self, engine_config: EngineConfig, draft) -> None:
        for what, present in (("a draft model (speculative decoding)", draft is not None),
                              ("tensor_parallel_size > 1", getattr(engine_config, "tensor_parallel_size", 1) != 1),
                              ("several processes (jax.distributed)", is_multi_process())):
            if present:
                raise NotSupportedError(f"lora_mode='dynamic' (per-request LoRA) is not supported with {what} yet")

    # -- what was loaded -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def model_path(self) -> str:
        return self.loaded.path

    @property
    def model_config(self):
        return self.loaded.config

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def vision(self):
        """The image side of a vision-language checkpoint (models/vision), else None."""
        return self.loaded.vision

    @property
    def lora(self):
        return self.loaded.lora

    @property
    def isq_factory(self):
        """The ISQFactory the projections were built through."""
        return self.loaded.isq_factory

    @property
    def max_model_len(self) -> int:
        return self.engine.limits.max_model_len

    # The engine's parts, for tests and tools that inspect them; serving code uses `engine`.
    @property
    def block_manager(self):
        return self.engine.block_manager

    @property
    def runner(self):
        return self.engine.runner

    # -- runtime re-quantization -----------------------------------------------------------

    def re_isq(self, isq_type: str | int) -> str:
        """Re-quantize the loaded model to `isq_type` while serving; returns the normalized type.

        Requests in flight finish on the old weights, new ones wait until the new weights
        are in place and every step shape is compiled again (mistral.rs' /re_isq). On a
        failure the previous type is restored and the error re-raised.
        """
        from .quant.isq import normalize_isq_type

        new_type = normalize_isq_type(isq_type)
        if self.isq_factory is None:
            raise NotSupportedError("re-quantizing (re_isq) is only available for GGUF models in mistralrs-jax")
        self._refuse_multi_host("re-quantizing (re_isq)")
        if getattr(self.loaded, "xlora", None) is not None:
            raise NotSupportedError("re-quantizing (re_isq) an X-LoRA model is not supported yet (the re-built "
                                    "projections would drop their adapter stacks); start it with --isq instead")
        if self.engine.runner.tp_relaid_out:
            raise NotSupportedError("re-quantizing (re_isq) is not supported yet for a model whose fused projections "
                                    "or KV heads were re-laid out for -tp (fused qkv/gate_up, or fewer KV heads "
                                    "than devices); restart with --isq instead")
        with self._re_isq_lock:
            self.engine.swap_weights(lambda: self._requantize_keeping_adapters(new_type), self.model,
                                     warmup=bool(self.engine_config.warmup))
        return new_type

    def _requantize_keeping_adapters(self, new_type: str) -> None:
        try:
            self._requantize(new_type)
        finally:  # re-ISQ rebuilds each Linear in place; per-request LoRA stacks go back on them
            if self.adapter_slots is not None:
                self.adapter_slots.held.reattach()

    def _requantize(self, new_type: str) -> None:
        """On the engine loop thread, with no sequence in flight and the runner's weights dropped."""
        factory = self.isq_factory
        old_type = factory.isq_type
        start = time.perf_counter()
        try:
            factory.requantize(new_type)
        except BaseException:
            log.exception("re-ISQ to %s failed; restoring %s", new_type, old_type)
            factory.requantize(old_type)
            raise
        else:
            self.isq_type = new_type
        finally:
            factory.close()
        log.info("re-ISQ %s -> %s in %.1fs: %s", old_type, new_type, time.perf_counter() - start, factory.summary())

    def _warmup(self, background: bool = False) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(desc="compiling step shapes", unit="shape", disable=None, leave=False)

        def progress(done, total, shape):
            bar.total = total
            bar.update(1)
            bar.set_postfix_str(f"tokens={shape[0]} seqs={shape[1]}")

        self.engine.warmup(progress, background=background)
        bar.close()
        if self.vision is not None:
            self.vision.warmup()  # the vision tower, once per image-count bucket

    # -- prompts -----------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.loaded.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def _prompt_ids(self, prompt) -> tuple[list[int], str | None, Any]:
        """(ids, text, image inputs or None) of a string, token ids, or a vLLM-style dict prompt
        {"prompt" or "prompt_token_ids", "multi_modal_data": {"image": one or a list}} whose
        text holds one image placeholder (e.g. "<image>") per image."""
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if ids is None and not isinstance(text, str):
                raise InvalidRequestError("a dict prompt needs \"prompt\" (text) or \"prompt_token_ids\"")
            ids = [int(t) for t in ids] if ids is not None else self.tokenizer.encode(text, add_special_tokens=True)
            images = (prompt.get("multi_modal_data") or {}).get("image")
            if images is None or (isinstance(images, (list, tuple)) and not images):
                return ids, text, None
            ids, multimodal = self._require_vision().prepare(
                ids, list(images) if isinstance(images, (list, tuple)) else [images],
                check_length=self.engine.check_prompt_fits)
            return ids, text, multimodal
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True), prompt, None
        return [int(t) for t in prompt], None, None

    def _require_vision(self):
        if self.vision is None:
            raise ImageError(f"{self.model_name} is a text-only model and takes no images: send text only, or "
                             f"load a vision model (supported: {', '.join(SUPPORTED_VISION_ARCHS)})",
                             code="images_not_supported")
        return self.vision

    @property
    def chat_template(self) -> ChatTemplate:
        return self.loaded.chat_template

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    local_images: bool | str = True, **template_kwargs) -> tuple[list[int], str, Any]:
        """(token ids, rendered text, image inputs or None): `chat_prompt_ids` for messages that may
        hold image parts (OpenAI `image_url`, vLLM `image_pil`); each image's placeholder is expanded
        to the model's image tokens and its features computed here. `local_images`: whether image
        paths may be read (True), not (False, the server's default), or only under a directory."""
        from .models.vision.image_processing import check_image_source
        from .models.vision.messages import render_with_images, split_image_parts

        template_messages, images = split_image_parts(messages)
        if not images:
            return (*self.chat_prompt_ids(messages, add_generation_prompt, **template_kwargs), None)
        vision = self._require_vision()
        for image in images:
            check_image_source(image, local_images)
        text = render_with_images(lambda m: self.apply_chat_template(m, add_generation_prompt=add_generation_prompt,
                                                                     **template_kwargs),
                                  template_messages, len(images), vision.image_token)
        ids, multimodal = vision.prepare(self.tokenizer.encode_prompt(text), images,
                                         check_length=self.engine.check_prompt_fits)
        return ids, text, multimodal

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                        **template_kwargs) -> tuple[list[int], str]:
        """(token ids, rendered text) of a conversation's prompt, as `chat` and the server feed it.
        `template_kwargs` reach the template as variables (`tools`, `enable_thinking`, ...)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.tokenizer.encode_prompt(text), text

    # -- generation --------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 lora: str | None = None) -> list[RequestOutput]:
        """`lora`: the name of a loaded adapter every prompt runs with (lora_mode="dynamic")."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prepared = [self._prompt_ids(p) for p in prompts]
        return self._run(prepared, params, lora)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, lora: str | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prepared = [self.chat_prompt(m, add_generation_prompt) for m in conversations]
        return self._run(prepared, params, lora)

    # -- per-request LoRA (lora_mode="dynamic") ----------------------------------------------

    def resolve_lora(self, name: str, param: str = "lora"):
        """The loaded adapter called `name` (LoraNotFoundError, a 404, when none is)."""
        if self.adapter_slots is None:
            raise NotSupportedError(f"{param}={name!r}: selecting a LoRA adapter per request needs "
                                    "lora_mode='dynamic' (--lora-mode dynamic); this model serves without one")
        return self.adapter_slots.resolve(name, param=param)

    def with_lora(self, params: SamplingParams, lora: str | None) -> SamplingParams:
        return params if lora is None else dataclasses.replace(params, lora=self.resolve_lora(lora))

    def load_lora(self, name: str, path: str, weight: float = 1.0):
        """Load the PEFT adapter at `path` into a free slot as `name`, while serving (no compile)."""
        if self.adapter_slots is None:
            raise NotSupportedError("loading a LoRA adapter while serving needs lora_mode='dynamic' (--lora-mode "
                                    "dynamic)")
        return self.adapter_slots.add(name, path, weight)

    def unload_lora(self, name: str):
        """Unload `name`: new requests cannot use it; running ones finish with it, then its slot frees."""
        self.resolve_lora(name, param="name")
        return self.adapter_slots.remove(name)

    def loras(self) -> list:
        return [] if self.adapter_slots is None else self.adapter_slots.list()

    def _run(self, prepared, params, lora: str | None = None) -> list[RequestOutput]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prepared)
        if len(params) != len(prepared):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prepared)} prompts")
        params = [self.with_lora(p, lora) for p in params]
        handles = [self.engine.add_request(ids, p, prompt=text, multimodal=multimodal)
                   for (ids, text, multimodal), p in zip(prepared, params)]
        return [h.result() for h in handles]

    def stream(self, prompt, params: SamplingParams | None = None, lora: str | None = None) -> Iterator[str]:
        yield from self._stream(*self._prompt_ids(prompt), params, lora)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None,
                    lora: str | None = None) -> Iterator[str]:
        yield from self._stream(*self.chat_prompt(messages), params, lora)

    def _stream(self, ids, text, multimodal, params, lora: str | None = None) -> Iterator[str]:
        handle = self.engine.add_request(ids, self.with_lora(params or SamplingParams(), lora), prompt=text,
                                         multimodal=multimodal)
        try:
            for delta in handle:
                if delta.text:
                    yield delta.text
        finally:
            if not handle.finished:
                handle.abort()

    def score(self, token_ids: list[int], images: list | None = None, lora: str | None = None) -> np.ndarray:
        """Teacher-forced f32 logits [len, vocab]: row i is the distribution of token i+1.

        With `images` (vision models), `token_ids` hold one image placeholder per image, expanded
        here (rows follow the expanded prompt), unless they are expanded already."""
        if not token_ids:
            raise ValueError("score() needs at least one token")
        self._refuse_multi_host("score()")
        multimodal = None
        if images:
            token_ids, multimodal = self._require_vision().prepare(token_ids, images)
        with self._re_isq_lock:  # re_isq swaps the runner's weights; score runs on the caller's thread
            if lora is not None:  # with an adapter (the adapter's slot stays loaded while this runs)
                return self.engine.runner.score(list(token_ids), multimodal=multimodal,
                                                lora_slot=self.resolve_lora(lora).slot)
            return self.engine.score(list(token_ids), multimodal=multimodal)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. between benchmark runs)."""
        self.engine.reset_prefix_cache()

    @property
    def weight_bytes(self) -> int:
        """Bytes the model's weights occupy as held (packed blocks at the file's size, dense
        weights at their dtype)."""
        from .memory import weight_bytes

        return weight_bytes(self.model)

    def metrics(self) -> dict:
        return {**self.engine.stats(), "weight_bytes": self.weight_bytes}

    def _refuse_multi_host(self, what: str) -> None:
        if getattr(self, "distributed", None) is not None:
            raise NotSupportedError(f"{what} is not supported across several processes (--num-processes) yet; "
                                    "run it in a single process")

    def shutdown(self) -> None:
        if getattr(self, "distributed", None) is not None:
            self.distributed.close()  # process 0 releases the others
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
