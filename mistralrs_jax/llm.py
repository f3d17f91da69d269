"""`LLM`: the offline Python API (vLLM's shape) over the engine."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator

import numpy as np
import psutil

from .config import EngineConfig, ModelConfig
from .engine.block_manager import BlockManager
from .engine.contiguous_cache import ContiguousBlockManager, contiguous_pool_layout
from .engine.engine import Engine
from .engine.runner import ModelRunner
from .engine.scheduler import Scheduler
from .engine.speculative import DEFAULT_GAMMA
from .errors import ImageError, InvalidRequestError, NotSupportedError
from .loading.chat_template import ChatTemplate
from .loading.ggml import open_model_file
from .loading.hub import resolve_model_files, resolve_tokenizer_source
from .loading.tokenizer import Tokenizer, load_tokenizer
from .loading.gguf_weights import build_model_from_gguf
from .models.model_config import config_from_gguf
from .models.registry import check_gguf_architecture
from .models.vision import SUPPORTED_VISION_ARCHS
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 512 << 20  # host memory for the KV cache when no budget flag is given
CPU_DEFAULT_MAX_BATCHED_TOKENS = 256
GPU_DEFAULT_MAX_BATCHED_TOKENS = 2048
DEFAULT_MAX_MODEL_LEN_CAP = 8192


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


def kv_cache_num_blocks(config: ModelConfig, engine: EngineConfig, bytes_per_elem: int = 4) -> int:
    """Blocks in the pool, from --pa-gpu-mem (MB), --pa-gpu-mem-usage (fraction) or --pa-ctxt-len (tokens)."""
    import jax

    per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * bytes_per_elem
    per_block = per_token * engine.pa_blk_size
    if engine.pa_gpu_mem is not None:
        budget = engine.pa_gpu_mem * (1 << 20)
    elif engine.pa_gpu_mem_usage is not None:
        if not 0 < engine.pa_gpu_mem_usage <= 1:
            raise NotSupportedError(f"--pa-gpu-mem-usage must be in (0, 1], got {engine.pa_gpu_mem_usage}")
        device = jax.devices()[0]
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        total = (stats or {}).get("bytes_limit") or psutil.virtual_memory().total
        budget = engine.pa_gpu_mem_usage * total
    elif engine.pa_ctxt_len is not None:
        budget = engine.pa_ctxt_len * per_token
    elif jax.default_backend() == "cpu":
        budget = min(CPU_DEFAULT_KV_BYTES, psutil.virtual_memory().available // 8)
    else:
        stats = jax.devices()[0].memory_stats() or {}
        budget = 0.8 * max(stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0), per_block * 64)
    # +1: block 0 is the trash block padding tokens write into.
    return max(2, int(budget // per_block)) + 1


def _config_json_near(*sources: str | None) -> str | None:
    """The first config.json beside one of `sources` (a directory, or a file in one)."""
    for source in sources:
        if not source:
            continue
        directory = source if os.path.isdir(source) else os.path.dirname(source)
        path = os.path.join(directory, "config.json")
        if os.path.isfile(path):
            return path
    return None


def _load_lora(adapters: list[str] | str | None, weights: list[float] | None, token_source: str):
    """The LoraMerger of `LLM(lora_adapters=..., lora_weights=...)`, or None without adapters."""
    if not adapters:
        if weights:
            raise NotSupportedError("lora_weights were given without lora_adapters")
        return None
    from .loading.adapters.lora import LoraMerger

    return LoraMerger.load([adapters] if isinstance(adapters, str) else list(adapters), weights, token_source)


class LLM:
    def __init__(
        self,
        model: str | None = None,
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        token_source: str = "cache",
        revision: str | None = None,
        dtype: str = "auto",
        max_seqs: int = 32,
        max_num_batched_tokens: int | None = None,
        pa_blk_size: int = 16,
        pa_ctxt_len: int | None = None,
        pa_gpu_mem: int | None = None,
        pa_gpu_mem_usage: float | None = None,
        prefix_cache_n: int = 16,
        no_paged_attn: bool = False,
        cpu_weights: str = "f32",
        chat_template: str | None = None,
        gqa: int | None = None,
        isq: str | int | None = None,
        isq_cache: str | None = None,
        lora_adapters: list[str] | None = None,
        lora_weights: list[float] | None = None,
        max_model_len: int | None = None,
        token_buckets: list[int] | None = None,
        seq_buckets: list[int] | None = None,
        draft_model: str | None = None,
        draft_gguf_file: str | None = None,
        draft_isq: str | int | None = None,
        speculative_gamma: int = DEFAULT_GAMMA,
        warmup: bool = True,
    ):
        import jax

        from .quant.isq import normalize_isq_type

        _enable_compilation_cache()
        # Normalized before anything loads, so a bad --isq fails at once.
        self.isq_type: str | None = normalize_isq_type(isq) if isq is not None else None
        self._isq_factory = None  # the ISQFactory every GGUF projection was built through (re_isq uses it)
        self._re_isq_lock = threading.Lock()
        # LoRA adapters are read (and checked) before the base model, so a bad adapter fails at once.
        self.lora = _load_lora(lora_adapters, lora_weights, token_source)
        if pa_blk_size not in (8, 16, 32):
            raise NotSupportedError(f"--pa-blk-size must be 8, 16 or 32, got {pa_blk_size}")
        self.engine_config = EngineConfig(
            max_seqs=max_seqs, max_num_batched_tokens=max_num_batched_tokens, pa_blk_size=pa_blk_size,
            pa_ctxt_len=pa_ctxt_len, pa_gpu_mem=pa_gpu_mem, pa_gpu_mem_usage=pa_gpu_mem_usage,
            prefix_cache_n=prefix_cache_n, no_paged_attn=no_paged_attn, cpu_weights=cpu_weights,
            token_buckets=token_buckets, seq_buckets=seq_buckets, warmup=warmup,
        )
        resolved = resolve_model_files(model, gguf_file=gguf_file, token_source=token_source, revision=revision,
                                       kind="gguf" if gguf_file or model is None or str(model).endswith(".gguf") else "auto")
        self.model_name = resolved.display_name
        tokenizer = resolve_tokenizer_source(tokenizer, token_source)  # a repo id -> its downloaded files
        self.vision = None  # the image side of a vision-language checkpoint (models/vision), else None
        if resolved.kind == "plain":  # a Hugging Face directory: config.json + *.safetensors
            from .loading.safetensors import build_model_from_hf, load_hf_config
            from .models.vision import vision_text_config

            self.model_path = resolved.model_dir
            # A vision-language checkpoint is served as its language model plus `self.vision`.
            vision_config = vision_text_config(self.model_path)
            if vision_config is not None and draft_model is not None:  # refused before any weight loads
                raise NotSupportedError("speculative decoding (a draft model) is not supported for vision models yet")
            self.model_config = vision_config or load_hf_config(self.model_path)
            self.tokenizer: Tokenizer = load_tokenizer(tokenizer or self.model_path)
        else:
            self.model_path = resolved.gguf_path
            # A legacy GGML file lacks eps / RoPE base / context: a config.json beside the
            # tokenizer or the file supplies them (llama.cpp's --model-metadata-dir).
            gguf = open_model_file(self.model_path, gqa=gqa,
                                   config_path=_config_json_near(tokenizer, self.model_path))
            check_gguf_architecture(self.model_path, gguf.architecture)
            self.model_config = config_from_gguf(gguf.metadata, self.model_path)
            self.tokenizer = load_tokenizer(tokenizer) if tokenizer else Tokenizer.from_gguf_metadata(gguf.metadata)
        self._chat_template = ChatTemplate.for_tokenizer(self.tokenizer, override=chat_template)
        log.info("loading %s (%s, %d layers) weights as %s (dtype %s)", self.model_name, self.model_config.arch,
                 self.model_config.num_layers, cpu_weights if resolved.kind == "gguf" else "dense", dtype)
        if resolved.kind == "plain":
            self.model = self._load_model(
                lambda wrap: build_model_from_hf(self.model_path, self.model_config, dtype=dtype, wrap_linear=wrap),
                isq_cache)
            from .loading.safetensors import SafetensorsWeights
            from .models.vision import load_vision

            self.vision = load_vision(self.model_path, self.tokenizer, dtype, open_weights=SafetensorsWeights)
        else:
            self.model = self._load_model(
                lambda wrap: build_model_from_gguf(gguf, self.model_config, cpu_weights=cpu_weights, dtype=dtype,
                                                   wrap_linear=wrap),
                isq_cache)

        # Speculative decoding: a draft model proposes, this one verifies (engine/speculative.py).
        self.draft = self._load_draft(draft_model, draft_gguf_file, draft_isq, speculative_gamma,
                                      token_source=token_source, revision=revision, dtype=dtype, cpu_weights=cpu_weights)
        self.speculative_gamma = speculative_gamma if self.draft is not None else None

        ec = self.engine_config
        num_blocks = kv_cache_num_blocks(self.model_config, ec)
        if self.draft is not None:  # the draft's KV cache shares the budget (and the block tables)
            from .engine.speculative import shared_pool_num_blocks

            num_blocks = shared_pool_num_blocks(num_blocks, self.model_config, self.draft.config, pa_ctxt_len is not None)
        default_cap = min(self.model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        if no_paged_attn:
            # One contiguous slot of max_model_len tokens per sequence (engine/contiguous_cache.py).
            # Without an explicit max_model_len the KV budget is split between the max_seqs slots.
            slot_tokens = max_model_len or min(default_cap, (num_blocks - 1) // max_seqs * pa_blk_size)
            if slot_tokens < 2:
                raise NotSupportedError(
                    f"--no-paged-attn splits the KV cache into {max_seqs} slots, leaving each under 2 tokens: "
                    f"lower --max-seqs or give the KV cache more memory")
            num_blocks, slot_blocks = contiguous_pool_layout(max_seqs, slot_tokens, pa_blk_size)
            self.max_model_len = slot_tokens
            self.block_manager = ContiguousBlockManager(max_seqs, slot_blocks, pa_blk_size)
        else:
            self.max_model_len = min(max_model_len or default_cap, (num_blocks - 1) * pa_blk_size)
            self.block_manager = BlockManager(num_blocks, pa_blk_size, enable_prefix_caching=prefix_cache_n > 0,
                                              prefix_cache_n=prefix_cache_n)
        backend = jax.default_backend()
        batched = max_num_batched_tokens or (CPU_DEFAULT_MAX_BATCHED_TOKENS if backend == "cpu"
                                             else GPU_DEFAULT_MAX_BATCHED_TOKENS)
        batched = max(batched, max_seqs)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_seqs, max_num_batched_tokens=batched,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(self.model, self.model_config, num_blocks, pa_blk_size, self.max_model_len,
                                  max_seqs, batched + self._lookahead_tokens(max_seqs), token_buckets=token_buckets,
                                  seq_buckets=seq_buckets, input_embeds=self.vision is not None)
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB), max model len %d, buckets tokens=%s seqs=%s",
                 num_blocks - 1, pa_blk_size, self.runner.kv_cache_bytes / 2**20, self.max_model_len,
                 self.runner.token_buckets, self.runner.seq_buckets)
        eos = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        if self.draft is None:
            self.engine = Engine(self.runner, self.scheduler, self.tokenizer, eos, self.model_config.vocab_size)
        else:
            self.engine = self._speculative_engine(eos)
        if warmup:
            self._warmup()
        self.engine.metrics.compiles_at_start = self.engine.metrics.snapshot()["compiles"]
        self.engine.start()

    def _load_model(self, build, isq_cache: str | None):
        """`build(wrap_linear)` the model with every projection going through an ISQFactory
        (even without ISQ, so `re_isq` can re-quantize later), reading and filling the ISQ
        cache. GGUF files and safetensors directories alike. LoRA adapters (`self.lora`) are
        merged outside ISQ, so ISQ and re-ISQ quantize the merged weights."""
        from .quant.isq import wrap_factory
        from .quant.isq_cache import isq_cache_key, load_isq_cache, save_isq_cache

        key = cached = None
        if isq_cache is not None and self.isq_type is not None:
            key = isq_cache_key(self.model_path, self.isq_type,
                                **({"lora": self.lora.fingerprint()} if self.lora is not None else {}))
            cached = load_isq_cache(isq_cache, key)
            log.info("ISQ cache %s: %s", isq_cache, "hit" if cached is not None else "miss")

        def wrap(make_linear):
            self._isq_factory = wrap_factory(make_linear, self.isq_type, cache=cached)
            if self.lora is not None:
                return self.lora.wrap(self._isq_factory, self.model_config)
            return self._isq_factory

        model = build(wrap)
        if self.lora is not None:
            self.lora.finish()
        factory = self._isq_factory
        factory.close()
        if self.isq_type is not None:
            log.info("ISQ %s: %s (%d tensors from the cache)", self.isq_type, factory.summary(), factory.cache_hits)
        if key is not None and cached is None:
            save_isq_cache(isq_cache, key, factory.quantized_arrays())
        return model

    @property
    def isq_factory(self):
        """The ISQFactory the projections were built through."""
        return self._isq_factory

    def re_isq(self, isq_type: str | int) -> str:
        """Re-quantize the loaded model to `isq_type` while serving; returns the normalized type.

        Requests in flight finish on the old weights, new ones wait until the new weights
        are in place and every step shape is compiled again (mistral.rs' /re_isq). On a
        failure the previous type is restored and the error re-raised.
        """
        from .quant.isq import normalize_isq_type

        new_type = normalize_isq_type(isq_type)
        if self._isq_factory is None:
            raise NotSupportedError("re-quantizing (re_isq) is only available for GGUF models in mistralrs-jax")
        with self._re_isq_lock:
            self.engine.run_exclusive(lambda: self._requantize_now(new_type))
        return new_type

    def _requantize_now(self, new_type: str) -> None:
        """On the engine loop thread, with no sequence in flight."""
        import time

        old_type = self._isq_factory.isq_type
        start = time.perf_counter()
        self.runner.state_leaves = None  # drop the runner's references so old arrays can go tensor by tensor
        try:
            self._isq_factory.requantize(new_type)
        except BaseException:
            log.exception("re-ISQ to %s failed; restoring %s", new_type, old_type)
            self._isq_factory.requantize(old_type)
            raise
        else:
            self.isq_type = new_type
        finally:
            self._isq_factory.close()
            self.runner.rebind_model(self.model)
            self.block_manager.reset_prefix_cache()  # cached KV was computed with the old weights
            if self.engine_config.warmup:
                self._warmup()
            self.engine.metrics.compiles_at_start = self.engine.metrics.snapshot()["compiles"]
        log.info("re-ISQ %s -> %s in %.1fs: %s", old_type, new_type, time.perf_counter() - start,
                 self._isq_factory.summary())

    # -- speculative decoding ----------------------------------------------------------

    def _load_draft(self, draft_model: str | None, draft_gguf_file: str | None, draft_isq, gamma: int, **load):
        """The draft model (checked to share the target's vocabulary), or None without one."""
        from .engine.speculative import check_draft_vocabulary, load_draft_model

        if draft_model is None:
            if draft_gguf_file is not None or draft_isq is not None:
                raise NotSupportedError("draft_gguf_file / draft_isq were given without draft_model")
            return None
        if not isinstance(gamma, int) or gamma < 1:
            raise NotSupportedError(f"speculative_gamma (-g/--gamma) must be a positive integer, got {gamma!r}")
        draft = load_draft_model(draft_model, draft_gguf_file, isq=draft_isq, **load)
        check_draft_vocabulary(self.tokenizer, self.model_config, draft)
        log.info("speculative decoding: draft %s (%s, %d layers%s), gamma %d", draft.name, draft.config.arch,
                 draft.config.num_layers, f", ISQ {draft.isq_type}" if draft.isq_type else "", gamma)
        return draft

    def _lookahead_tokens(self, max_seqs: int) -> int:
        """Extra step tokens speculation needs beyond the scheduler's budget: gamma per sequence."""
        return 0 if self.draft is None else max_seqs * self.speculative_gamma

    def _speculative_engine(self, eos: set[int]):
        from .engine.speculative import SpeculativeEngine

        draft_runner = ModelRunner(self.draft.model, self.draft.config, self.runner.num_blocks, self.runner.block_size,
                                   self.max_model_len, self.runner.seq_buckets[-1], self.runner.token_buckets[-1],
                                   token_buckets=self.runner.token_buckets, seq_buckets=self.runner.seq_buckets)
        log.info("draft KV cache: %.0f MiB", draft_runner.kv_cache_bytes / 2**20)
        return SpeculativeEngine(self.runner, draft_runner, self.scheduler, self.tokenizer, eos,
                                 self.model_config.vocab_size, self.speculative_gamma)

    def _warmup(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(desc="compiling step shapes", unit="shape", disable=None, leave=False)

        def progress(done, total, shape):
            bar.total = total
            bar.update(1)
            bar.set_postfix_str(f"tokens={shape[0]} seqs={shape[1]}")

        (self.runner.warmup if self.draft is None else self.engine.warmup)(progress)
        bar.close()
        if self.vision is not None:
            self.vision.warmup()  # the vision tower, once per image-count bucket

    # -- prompts -----------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

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
                check_length=self.scheduler.check_prompt_fits)
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
        return self._chat_template

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
                                         check_length=self.scheduler.check_prompt_fits)
        return ids, text, multimodal

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                        **template_kwargs) -> tuple[list[int], str]:
        """(token ids, rendered text) of a conversation's prompt, as `chat` and the server feed it.
        `template_kwargs` reach the template as variables (`tools`, `enable_thinking`, ...)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.tokenizer.encode_prompt(text), text

    # -- generation --------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prepared = [self._prompt_ids(p) for p in prompts]
        return self._run(prepared, params)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prepared = [self.chat_prompt(m, add_generation_prompt) for m in conversations]
        return self._run(prepared, params)

    def _run(self, prepared, params) -> list[RequestOutput]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prepared)
        if len(params) != len(prepared):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prepared)} prompts")
        handles = [self.engine.add_request(ids, p, prompt=text, multimodal=multimodal)
                   for (ids, text, multimodal), p in zip(prepared, params)]
        return [h.result() for h in handles]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        yield from self._stream(*self._prompt_ids(prompt), params)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        yield from self._stream(*self.chat_prompt(messages), params)

    def _stream(self, ids, text, multimodal, params) -> Iterator[str]:
        handle = self.engine.add_request(ids, params or SamplingParams(), prompt=text, multimodal=multimodal)
        try:
            for delta in handle:
                if delta.text:
                    yield delta.text
        finally:
            if not handle.finished:
                handle.abort()

    def score(self, token_ids: list[int], images: list | None = None) -> np.ndarray:
        """Teacher-forced f32 logits [len, vocab]: row i is the distribution of token i+1.

        With `images` (vision models), `token_ids` hold one image placeholder per image, expanded
        here (rows follow the expanded prompt), unless they are expanded already."""
        if not token_ids:
            raise ValueError("score() needs at least one token")
        multimodal = None
        if images:
            token_ids, multimodal = self._require_vision().prepare(token_ids, images)
        with self._re_isq_lock:  # re_isq swaps the runner's weights; score runs on the caller's thread
            return self.runner.score(list(token_ids), multimodal=multimodal)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. between benchmark runs)."""
        self.engine.reset_prefix_cache()

    def metrics(self) -> dict:
        return self.engine.metrics.snapshot()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
