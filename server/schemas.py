"""Typed OpenAI request bodies. Bad input stops here with a 400 naming the parameter.

Types are checked strictly (`"temperature": "0.5"` is an error, as at OpenAI); value
ranges are checked by `SamplingParams`, so the engine and the server agree on them.
Unknown fields are ignored, as mistral.rs and vLLM do, so clients that send extras
(`user`, `metadata`, `prompt_cache_key`, ...) work; fields that would change the output or
promise something this server does not do (`UNSUPPORTED_FIELDS`: `audio`, `prediction`,
`store: true`, `verbosity`, vLLM's `guided_json`, llama.cpp's `mirostat`, ...) answer a 400
naming them, never a silent 200. A value that asks for nothing beyond what the server does
(`modalities: ["text"]`, `service_tier: "auto"`) is accepted.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from mistralrs_jax.errors import InvalidRequestError, MistralRsError, NotSupportedError
from mistralrs_jax.guidance import GuidedDecoding
from mistralrs_jax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams

from .errors import APIError
from .tools import check_tools, forced_call_constraint

# OpenAI's legacy /v1/completions default (chat has none: it runs to EOS or the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Strict):
    """One OpenAI content part; the chat template decides which kinds the model takes.
    Image parts (`image_url`) go to vision models (mistralrs_jax/models/vision)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def guided_decoding(self) -> GuidedDecoding | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GuidedDecoding("json_object", param="response_format")
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidRequestError('response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                                      '"schema": {...}}', param="response_format.json_schema.schema")
        return GuidedDecoding("json_schema", self.json_schema.schema_, param="response_format.json_schema.schema")


class Grammar(_Strict):
    """mistral.rs' `grammar` field: {"type": "regex" | "lark" | "json_schema" | "llguidance", "value": ...}."""

    type: Literal["regex", "lark", "json_schema", "llguidance"]
    value: str | dict[str, Any]

    def guided_decoding(self) -> GuidedDecoding:
        return GuidedDecoding(self.type, self.value, param="grammar")


# Fields of the OpenAI, vLLM, llama.cpp and mistral.rs APIs that would change the output and that this
# server does not implement: a 400 naming the field, rather than a 200 that silently ignores it.
UNSUPPORTED_FIELDS = {
    "audio": "audio output", "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "functions": "the legacy `functions` (use tools)",
    "function_call": "the legacy `function_call` (use tool_choice)", "adapters": "per-request adapters",
    "guided_json": "vLLM's guided_json (use response_format or grammar)",
    "guided_regex": "vLLM's guided_regex (use grammar)", "guided_choice": "vLLM's guided_choice (use grammar)",
    "guided_grammar": "vLLM's guided_grammar (use grammar)", "structured_outputs": "vLLM's structured_outputs "
    "(use response_format or grammar)", "json_schema": "a top-level json_schema (use response_format)",
    "mirostat": "mirostat sampling", "mirostat_tau": "mirostat sampling", "mirostat_eta": "mirostat sampling",
    "tfs_z": "tail-free sampling", "typical_p": "typical sampling", "top_a": "top-a sampling",
    "xtc_probability": "XTC sampling", "xtc_threshold": "XTC sampling", "dry_penalty_last_n": "dry_penalty_last_n "
    "(DRY looks at the whole sequence)", "min_tokens": "min_tokens", "use_beam_search": "beam search",
    "length_penalty": "beam search", "bad_words": "bad_words", "allowed_token_ids": "allowed_token_ids",
    "prompt_logprobs": "prompt logprobs", "repeat_last_n": "repeat_last_n (the penalty window is 64 tokens)",
    "penalty_last_n": "penalty_last_n (the penalty window is 64 tokens)", "n_probs": "n_probs (use logprobs)",
    "continue_final_message": "continue_final_message (use add_generation_prompt: false)",
    "store": "stored completions (store: true)", "verbosity": "output verbosity other than medium",
    "service_tier": "service tiers other than auto and default", "moderation": "moderation of input and output",
}
# Values of the fields above that ask for nothing beyond what this server does anyway.
_HARMLESS_VALUES: dict[str, tuple[Any, ...]] = {"modalities": (["text"],), "service_tier": ("auto", "default"),
                                                "verbosity": ("medium",)}
# Fields refused even when empty (OpenAI's search models search with `web_search_options: {}`).
_REFUSED_WHEN_PRESENT = {"web_search_options"}
# OpenAI fields accepted and ignored, because they change neither the output nor what the
# server promises: bookkeeping for OpenAI's own services, and prompt-cache hints (the prefix
# cache here is automatic). tests/test_request_fields.py checks every OpenAI field is either
# a request field, refused above, or listed here.
IGNORED_FIELDS = {"user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_options",
                  "prompt_cache_retention"}
_UNSET = (None, False, [], {}, "")
# Template variables the request sets through its own fields.
_TEMPLATE_RESERVED = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


class SamplingFields(_Strict):
    """The fields /v1/chat/completions and /v1/completions share."""

    model: str | None = None
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM / mistral.rs extensions the engine honours.
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # mistral.rs extensions: DRY sampling and a grammar constraint.
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    grammar: Grammar | None = None
    # Per-request LoRA (--lora-mode dynamic): the name of a loaded adapter (or send model "base:adapter").
    lora: str | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")

    def guided_decoding(self) -> GuidedDecoding | None:
        return self.grammar.guided_decoding() if self.grammar is not None else None

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                        default_seed: int | None = None, guided_decoding: GuidedDecoding | None = None,
                        **overrides: Any) -> SamplingParams:
        """`SamplingParams` for this request; an out-of-range value raises InvalidRequestError naming it."""
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs,
                                  "guided_decoding": guided_decoding, **overrides}
        for name in ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
                     "include_stop_str_in_output", "dry_multiplier", "dry_base", "dry_allowed_length",
                     "dry_sequence_breakers"):
            value = getattr(self, name)
            if value is not None and name not in overrides:
                kwargs[name] = value
        kwargs["seed"] = self.seed if self.seed is not None else default_seed
        if self.logit_bias:
            kwargs["logit_bias"] = _token_id_keys(self.logit_bias)
        return SamplingParams(**kwargs)


class LoraLoadRequest(_Strict):
    """`POST /v1/loras`: load the PEFT adapter directory `path` as `name` (per-request LoRA)."""

    name: str
    path: str
    weight: float = 1.0

    def check(self) -> None:
        """Nothing beyond the types: the adapter itself is checked when it loads."""


def _token_id_keys(logit_bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends logit_bias keys as strings of token ids (JSON objects have string keys)."""
    parsed = {}
    for key, bias in logit_bias.items():
        try:
            parsed[int(key)] = bias
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids written as strings (e.g. \"1234\"), got {key!r}",
                param="logit_bias") from None
    return parsed


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool | None = None  # extension: False continues the last message
    _tool_mode: str | None = PrivateAttr(default=None)
    # Reach the chat template as variables (vLLM / mistral.rs extensions; reasoning_effort is OpenAI's).
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise InvalidRequestError("messages must hold at least one message", param="messages")
        for index, message in enumerate(self.messages):
            for part_index, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if part.type == "image_url" and part.image_url is None:
                    raise InvalidRequestError("an image_url part needs {\"image_url\": {\"url\": ...}}",
                                              param=f"messages[{index}].content[{part_index}].image_url")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                          param="top_logprobs")
        self._tool_mode = check_tools(self.tools, self.tool_choice)
        self.guided_decoding()  # a malformed or conflicting constraint is a 400 now
        if self.chat_template_kwargs is not None:
            for key in self.chat_template_kwargs:
                if key in _TEMPLATE_RESERVED:
                    raise InvalidRequestError(f"chat_template_kwargs may not set {key!r}; use the request field",
                                              param=f"chat_template_kwargs.{key}")

    @property
    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required", or the name of the function the call must use."""
        return self._tool_mode

    def guided_decoding(self) -> GuidedDecoding | None:
        """The output constraint: response_format, grammar, or a forced tool call (at most one)."""
        constraints = [(name, value) for name, value in (
            ("response_format", self.response_format and self.response_format.guided_decoding()),
            ("grammar", self.grammar and self.grammar.guided_decoding()),
            ("tool_choice", self._tool_mode not in (None, "auto") and forced_call_constraint(
                self.tools or [], self._tool_mode, self.parallel_tool_calls is not False))) if value]
        if len(constraints) > 1:
            raise InvalidRequestError(f"{constraints[0][0]} and {constraints[1][0]} both constrain the output; "
                                      "send one of them", param=constraints[1][0])
        return constraints[0][1] if constraints else None

    def template_kwargs(self, reads) -> dict[str, Any]:
        """Variables for the chat template; `reads(name)` says whether the template uses a variable.
        One the template never mentions (enable_thinking, reasoning_effort or a chat_template_kwargs
        key) is a 400 naming it: passing it on would be a silent no-op. `enable_thinking: false` is
        the exception: a template without a thinking switch does not think, which is what it asks."""
        fields = {name: value for name, value in (("enable_thinking", self.enable_thinking),
                                                  ("reasoning_effort", self.reasoning_effort)) if value is not None}
        if fields.get("enable_thinking") is False and not reads("enable_thinking"):
            del fields["enable_thinking"]
        for params, names in (("", fields), ("chat_template_kwargs.", self.chat_template_kwargs or {})):
            for name in names:
                if not reads(name):
                    raise InvalidRequestError(f"{params}{name}: this model's chat template has no {name} setting; "
                                              "drop the field", param=params + name, code="not_supported")
        return {**(self.chat_template_kwargs or {}), **fields}

    @property
    def max_new_tokens(self) -> int | None:
        # max_tokens is deprecated in favour of max_completion_tokens; the newer one wins.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, Any]]:
        messages = []
        for message in self.messages:
            item = message.model_dump(exclude_none=True)
            if item.get("tool_calls"):  # an assistant turn that only calls tools keeps "content": null
                item.setdefault("content", None)
            if item["role"] == "developer":  # OpenAI's newer name for the system role
                item["role"] = "system"
            messages.append(item)
        return messages


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if isinstance(self.prompt, list) and (not self.prompt or any(
                isinstance(p, list) and not p for p in self.prompt)):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if self.suffix:
            raise NotSupportedError("suffix (fill-in-the-middle) is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise NotSupportedError("best_of other than n is not supported yet; drop best_of")
        if self.echo and self.logprobs is not None:
            raise NotSupportedError("echo together with logprobs needs prompt-token logprobs, which this server "
                                    "does not compute yet; drop one of them")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS


# --------------------------------------------------------------------------- parsing


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _is_type_tag(part: Any) -> bool:
    """Pydantic puts the union member it tried into the location (`str`, `list[int]`, `ContentPart`)."""
    return isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS or part[:1].isupper())


def _param_of(loc: tuple[Any, ...]) -> str:
    """`messages[0].content` from pydantic's location."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(part):
            out += f".{part}" if out else part
    return out or "body"


def validation_error(exc: ValidationError) -> APIError:
    """One 400 for a pydantic error: the first failing parameter and what it should be."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    param = _param_of(loc)
    shown = f" (got {_short_repr(first.get('input'))})"
    tag_at = next((i for i, part in enumerate(loc) if _is_type_tag(part)), None)
    if first["type"] == "missing":
        message, code, shown = f"{param} is required", "missing_required_parameter", ""
    elif tag_at is not None:  # a union: name every accepted form rather than the first one tried
        prefix = loc[:tag_at]
        forms = []
        for err in errors:
            err_loc = tuple(err["loc"])
            if err_loc[:tag_at] == prefix and len(err_loc) > tag_at and err_loc[tag_at] not in forms:
                forms.append(err_loc[tag_at])
        param = _param_of(prefix)
        shown = f" (got {_short_repr(_input_at(exc, prefix))})" if len(forms) > 1 else shown
        message, code = f"{param} must be {' or '.join(forms)}", "invalid_type"
    else:
        message, code = f"{param}: {first['msg'][0].lower()}{first['msg'][1:]}", "invalid_type"
    return APIError(400, message + shown, param=param, code=code)


def _input_at(exc: ValidationError, prefix: tuple[Any, ...]) -> Any:
    """The value the union was tried on: an error located one step (the member tag) below `prefix`."""
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if len(loc) == len(prefix) + 1 and loc[:-1] == prefix:
            return err.get("input")
    return None


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_request(model: type[SamplingFields], body: Any) -> Any:
    """Validate a decoded JSON body into `model` and run its semantic checks."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    for name, what in UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        present = value is not None if name in _REFUSED_WHEN_PRESENT else value not in _UNSET
        if present and value not in _HARMLESS_VALUES.get(name, ()):
            raise APIError(400, f"{name}: {what} is not supported by this server; drop the field", param=name,
                           code="not_supported")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    try:
        request.check()
    except MistralRsError as exc:
        raise APIError.from_engine(exc) from None
    return request
