"""Chat templates: a model's Jinja template turns a list of messages into its prompt text.

Templates come from model files, so they are untrusted code: they run in Jinja's immutable sandbox,
set up the way Hugging Face transformers sets it up (`trim_blocks`, `lstrip_blocks`, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text), so a template renders here
exactly as it does in `apply_chat_template`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from mistralrs_jax.errors import InvalidRequestError, TemplateError
from mistralrs_jax.loading.template_sandbox import check_syntax, shared_worker

logger = logging.getLogger(__name__)

# Used when a model ships no template. ChatML is what most small chat models (Qwen, SmolLM, ...) use.
DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template that looks at content parts itself (multimodal templates) gets the list as sent.
_HANDLES_CONTENT_PARTS = re.compile(
    r"\bis\s+(?:not\s+)?string\b|\bis\s+(?:not\s+)?iterable\b|\bis\s+(?:not\s+)?sequence\b"
    r"|\[\s*['\"]type['\"]\s*\]|\.type\b"
    r"|selectattr\(\s*['\"]type['\"]"  # LLaVA's: content | selectattr('type', 'equalto', 'image')
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks in
    transformers; for rendering a prompt it is just its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names so a template cannot plant dunder attributes."""

    def __init__(*args: Any, **kwargs: Any):  # same signature trick as Jinja's own Namespace
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own `tojson` escapes HTML characters and cannot indent; templates are written for this one.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


class _StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's sandbox hands back an Undefined for a forbidden attribute, which prints as nothing until
    it is called; refuse at the access instead, so a template reaching for internals fails loudly."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _make_dict
    return env


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches a template; a rich object's methods are not the sandbox's to judge."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "model_dump"):  # pydantic request models
        return _plain(value.model_dump(exclude_none=True))
    for kind in (bool, int, float, str):  # subclasses such as str-valued enums become the plain type
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _text_of_parts(parts: list[Any]) -> str | None:
    """The text of OpenAI content parts, or None if some part is not text (an image, audio...)."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None
    return "\n".join(texts)


class ChatTemplate:
    """A compiled chat template. `render(messages)` gives the prompt text to tokenize."""

    def __init__(
        self,
        template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        named_templates: Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ):
        """`template` None means the model has none: ChatML is used, with a warning.
        `special_tokens` adds other names the template may read (`unk_token`, `pad_token`, ...).
        `named_templates` are alternatives such as "tool_use", chosen by `render` when tools are given."""
        if template is None:
            logger.warning(
                "the model has no chat template; using ChatML (<|im_start|>role ... <|im_end|>). "
                "Pass --chat-template if the model expects another format."
            )
            template = DEFAULT_CHATML_TEMPLATE
        self.source = template
        self.context: dict[str, Any] = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.context.update({key: value or "" for key, value in (special_tokens or {}).items()})
        env = _environment()
        self._compiled = self._compile(env, template, "chat template")
        self._named = {
            name: self._compile(env, text, f"chat template {name!r}") for name, text in (named_templates or {}).items()
        }
        self._named_sources = dict(named_templates or {})

    @staticmethod
    def _compile(env: jinja2.Environment, template: str, what: str) -> str:
        # Parsed here for syntax errors only; compiled and rendered in the bounded worker (template_sandbox.py).
        check_syntax(env, template, what)
        return template

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, override: str | None = None) -> "ChatTemplate":
        """The template to use with `tokenizer`: `override` (template text or a path to a file holding it),
        else the model's own, else ChatML with a warning."""
        template = override
        if template is not None and "{" not in template:
            try:
                with open(template, encoding="utf-8") as handle:
                    template = handle.read()
            except OSError as exc:
                raise TemplateError(f"cannot read chat template file {override}: {exc}") from exc
        named = getattr(tokenizer, "chat_templates", None) or {}
        if template is None:
            template = getattr(tokenizer, "chat_template", None)
        if template is None:
            logger.warning(
                "%s has no chat template; using ChatML (<|im_start|>role ... <|im_end|>). "
                "Pass --chat-template if the model expects another format.",
                getattr(tokenizer, "source", "the model"),
            )
            template = DEFAULT_CHATML_TEMPLATE
        return cls(
            template,
            bos_token=getattr(tokenizer, "bos_token", None),
            eos_token=getattr(tokenizer, "eos_token", None),
            named_templates=None if override else named,
        )

    def reads(self, variable: str) -> bool:
        """Whether the template (or its tool-use variant) mentions `variable` (`tools`,
        `enable_thinking`, `reasoning_effort`, ...): a cheap look at its source, not a parse."""
        pattern = re.compile(rf"\b{re.escape(variable)}\b")
        return any(pattern.search(source) for source in (self.source, *self._named_sources.values()))

    @property
    def reads_tools(self) -> bool:
        """Whether the template renders `tools` itself (else the server lists them in a system message)."""
        return "tool_use" in self._named or self.reads("tools")

    def _prepare_messages(self, messages: Sequence[Any], source: str) -> list[dict[str, Any]]:
        keeps_parts = bool(_HANDLES_CONTENT_PARTS.search(source))
        prepared = []
        for index, message in enumerate(_plain(list(messages))):
            if not isinstance(message, dict) or "role" not in message:
                raise InvalidRequestError(f"messages[{index}] must be an object with a 'role'", param="messages")
            content = message.get("content")
            if isinstance(content, list) and not keeps_parts:
                text = _text_of_parts(content)
                if text is None:
                    raise InvalidRequestError(
                        f"messages[{index}] has non-text content, but this model's chat template takes text only",
                        param="messages",
                    )
                message["content"] = text
            elif content is None and not message.get("tool_calls"):
                message["content"] = ""
            elif content is None:  # an assistant turn that only calls tools: content null, as transformers passes it
                message["content"] = None
            for call in message.get("tool_calls") or ():
                # OpenAI sends arguments as a JSON string; templates index into them as a mapping.
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        parsed = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        continue
                    if isinstance(parsed, dict):
                        function["arguments"] = parsed
            prepared.append(message)
        return prepared

    def render(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts). Extra keywords reach the template as variables."""
        compiled, source = self._compiled, self.source
        if tools and "tool_use" in self._named:
            compiled, source = self._named["tool_use"], self._named_sources["tool_use"]
        context = dict(self.context)
        context.update(_plain(extra))
        context.update(
            messages=self._prepare_messages(messages, source),
            tools=_plain(list(tools)) if tools else None,
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return shared_worker(f"{__name__}:_environment").render(compiled, context)
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"chat template tried an operation the sandbox forbids: {exc}") from exc
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(), undefined names, ...
            raise TemplateError(f"chat template error: {exc.message or exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
            raise TemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
