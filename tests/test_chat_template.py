"""Chat templates from real model files render exactly as Hugging Face transformers renders them, and
hostile templates are stopped by the sandbox."""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime

import pytest

import _vocab_fixtures as fixtures
from mistralrs_jax.errors import InvalidRequestError, TemplateError
from mistralrs_jax.loading.chat_template import DEFAULT_CHATML_TEMPLATE, ChatTemplate
from mistralrs_jax.loading.tokenizer import read_gguf_metadata

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse. Ünïcödé: 日本語 🦙"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And   3+3?\n\n  "},
    ],
    [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
]


def _template_fields(name: str) -> dict:
    if name == "smollm2":
        try:
            path = fixtures.smollm2_gguf()
        except fixtures.ReferenceUnavailable as exc:
            pytest.skip(str(exc))
    else:
        try:
            path = fixtures.vocab_gguf(name)
        except fixtures.ReferenceUnavailable as exc:
            pytest.skip(f"llama.cpp vocab files unavailable: {exc}")
    return read_gguf_metadata(str(path))


def _transformers_render(template: str, messages, **kwargs) -> str:
    """What transformers' `apply_chat_template(..., tokenize=False)` renders: it hands the template and the
    tokenizer's special tokens to `render_jinja_template`."""
    chat_template_utils = pytest.importorskip(
        "transformers.utils.chat_template_utils", reason="transformers is the reference renderer here"
    )
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[copy.deepcopy(messages)], chat_template=template, **kwargs
    )
    return rendered[0]


def test_smollm2_template_renders_chatml():
    fields = _template_fields("smollm2")
    template = ChatTemplate(fields["tokenizer.chat_template"], bos_token="<|im_start|>", eos_token="<|im_end|>")
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi, how can I help?<|im_end|>\n"
        "<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(messages) == expected
    plain = copy.deepcopy(messages)
    plain[2]["content"] = "Name a color."
    assert expected == _transformers_render(
        fields["tokenizer.chat_template"],
        plain,
        add_generation_prompt=True,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    assert template.render(messages, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]


@pytest.mark.parametrize("name", ["smollm2", "qwen2", "phi-3", "command-r", "gemma-4"])
def test_model_templates_match_transformers(name):
    fields = _template_fields(name)
    tokens = fields["tokenizer.ggml.tokens"]
    bos, eos = tokens[fields["tokenizer.ggml.bos_token_id"]], tokens[fields["tokenizer.ggml.eos_token_id"]]
    source = fields["tokenizer.chat_template"]
    template = ChatTemplate(source, bos_token=bos, eos_token=eos)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = _transformers_render(
                source, messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
            )
            assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_tools_and_tool_calls_match_transformers():
    """Gemma 4's template (12 kB: macros, namespaces, dictsort, tools) with a tool round trip. OpenAI sends
    tool-call arguments as a JSON string; templates expect the object."""
    fields = _template_fields("gemma-4")
    source = fields["tokenizer.chat_template"]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "required": ["city"],
                    "properties": {
                        "city": {"type": "string", "description": "City name"},
                        "unit": {"type": "string", "enum": ["c", "f"]},
                    },
                },
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It's 21°C."},
        {"role": "user", "content": "Thanks"},
    ]
    reference_messages = copy.deepcopy(messages)
    reference_messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = _transformers_render(
        source, reference_messages, tools=tools, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>"
    )
    rendered = ChatTemplate(source, bos_token="<bos>", eos_token="<eos>").render(messages, tools=tools)
    assert rendered == expected
    assert "get_weather" in rendered and "Paris" in rendered


def test_named_tool_use_template_is_chosen_with_tools():
    fields = _template_fields("command-r")
    tool_use = fields["tokenizer.chat_template.tool_use"]
    template = ChatTemplate(
        fields["tokenizer.chat_template"],
        bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>",
        named_templates={"tool_use": tool_use, "rag": fields["tokenizer.chat_template.rag"]},
    )
    tools = [
        {
            "name": "internet_search",
            "description": "Search the web",
            "parameter_definitions": {"query": {"description": "what to look up", "type": "str", "required": True}},
        }
    ]
    messages = CONVERSATIONS[0]
    expected = _transformers_render(
        tool_use,
        messages,
        tools=tools,
        add_generation_prompt=True,
        bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>",
    )
    assert template.render(messages, tools=tools) == expected
    assert "internet_search" in expected
    assert "internet_search" not in template.render(messages)


def test_raise_exception_becomes_template_error_with_its_message():
    fields = _template_fields("command-r")
    template = ChatTemplate(fields["tokenizer.chat_template"], bos_token="<BOS_TOKEN>")
    with pytest.raises(TemplateError, match="Conversation roles must alternate user/assistant"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="custom failure: user"):
        ChatTemplate("{{ raise_exception('custom failure: ' + messages[0]['role']) }}").render(
            [{"role": "user", "content": ""}]
        )


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ namespace(__init__=1) }}",
        "{% set items = [] %}{{ items.append(1) }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_sandbox_escapes_raise_template_error(attack):
    with pytest.raises(TemplateError, match="sandbox forbids|unsafe|underscore"):
        ChatTemplate(attack).render(CONVERSATIONS[0])


def test_tojson_strftime_and_extra_variables():
    template = ChatTemplate(
        "{{ tools | tojson }}|{{ {'k': 'é<>&'} | tojson(indent=2) }}|{{ strftime_now('%Y') }}|{{ custom }}|{{ bos_token }}",
        bos_token="<s>",
    )
    rendered = template.render(CONVERSATIONS[0], tools=[{"name": "ü"}], custom="extra")
    assert rendered == '[{"name": "ü"}]|{\n  "k": "é<>&"\n}|' + datetime.now().strftime("%Y") + "|extra|<s>"


def test_content_parts():
    # A template that reads content as a string gets the text parts joined.
    text_only = ChatTemplate("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    assert text_only.render([{"role": "user", "content": parts}]) == "[line one\nline two]"
    with pytest.raises(InvalidRequestError, match="non-text content"):
        text_only.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    # A template that walks the parts itself gets them as sent.
    multimodal = ChatTemplate(
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}<{{ p['type'] }}>{% endfor %}{% endif %}{% endfor %}"
    )
    content = [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "what?"}]
    assert multimodal.render([{"role": "user", "content": content}]) == "<image_url><text>"


def test_invalid_templates_and_messages():
    with pytest.raises(TemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="undefined"):
        ChatTemplate("{{ no_such_function() }}").render(CONVERSATIONS[0])
    with pytest.raises(InvalidRequestError, match="role"):
        ChatTemplate(DEFAULT_CHATML_TEMPLATE).render([{"content": "no role"}])


def test_generation_block_renders_its_body():
    template = ChatTemplate(
        "{% for m in messages %}{% generation %}<{{ m['content'] }}>{% endgeneration %}{% endfor %}"
    )
    assert template.render(CONVERSATIONS[0]) == "<Hi there!>"


class _TokenizerWithoutTemplate:
    chat_template = None
    chat_templates: dict = {}
    bos_token = "<s>"
    eos_token = "</s>"
    source = "test-model"


def test_default_chatml_with_warning_and_override_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mistralrs_jax.loading.chat_template"):
        template = ChatTemplate.for_tokenizer(_TokenizerWithoutTemplate())
    assert "no chat template" in caplog.text and "test-model" in caplog.text
    rendered = template.render(CONVERSATIONS[2])
    expected = _transformers_render(DEFAULT_CHATML_TEMPLATE, CONVERSATIONS[2], add_generation_prompt=True)
    assert rendered == expected
    assert rendered.startswith("<|im_start|>user\nTell me a joke<|im_end|>\n") and rendered.endswith(
        "<|im_start|>assistant\n"
    )
    override = tmp_path / "template.jinja"
    override.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert (
        ChatTemplate.for_tokenizer(_TokenizerWithoutTemplate(), override=str(override)).render(CONVERSATIONS[0])
        == "<s>Hi there!"
    )
    with pytest.raises(TemplateError, match="missing.jinja"):
        ChatTemplate.for_tokenizer(_TokenizerWithoutTemplate(), override=str(tmp_path / "missing.jinja"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mistralrs_jax.loading.chat_template"):
        assert ChatTemplate(None).render(CONVERSATIONS[2]) == expected
    assert "no chat template" in caplog.text


THINKING_TEMPLATE = (
    "{%- for message in messages %}<|{{ message.role }}|>{{ message.content }}\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n{% endif %}{% if reasoning_effort %}[effort={{ reasoning_effort }}]{% endif %}"
    "{% if custom %}[custom]{% endif %}{% endif %}"
)


def test_template_variables_from_the_request_match_transformers():
    """enable_thinking, reasoning_effort and chat_template_kwargs reach the template as variables, as
    transformers' apply_chat_template(**kwargs) passes them; `reads` tells which a template uses."""
    from server.schemas import ChatCompletionRequest

    template = ChatTemplate(THINKING_TEMPLATE)
    assert template.reads("enable_thinking") and template.reads("reasoning_effort") and not template.reads_tools
    messages = [{"role": "user", "content": "Hi"}]
    request = ChatCompletionRequest.model_validate({
        "messages": messages, "enable_thinking": False, "reasoning_effort": "low",
        "chat_template_kwargs": {"custom": 1}})
    kwargs = request.template_kwargs(template.reads)
    assert kwargs == {"enable_thinking": False, "reasoning_effort": "low", "custom": 1}
    expected = _transformers_render(THINKING_TEMPLATE, messages, add_generation_prompt=True, **kwargs)
    assert template.render(messages, **kwargs) == expected
    assert "<think>\n\n</think>" in expected and "[effort=low]" in expected and "[custom]" in expected
    plain = ChatTemplate(DEFAULT_CHATML_TEMPLATE)  # reads none of them: each is a 400 naming it
    no_thinking = ChatCompletionRequest.model_validate({"messages": messages, "enable_thinking": False})
    assert no_thinking.template_kwargs(plain.reads) == {}  # asks for what a template without the switch does
    for body, param in (({"enable_thinking": True}, "enable_thinking"), ({"reasoning_effort": "low"}, "reasoning_effort"),
                        ({"chat_template_kwargs": {"custom": 1}}, "chat_template_kwargs.custom")):
        unread = ChatCompletionRequest.model_validate({"messages": messages, **body})
        with pytest.raises(InvalidRequestError, match=param) as info:
            unread.template_kwargs(plain.reads)
        assert info.value.param == param


def test_a_tool_conversation_from_a_request_body_renders_as_transformers_renders_it():
    """The server's path: a JSON body with an assistant turn of tool_calls and "content": null, then a
    tool result. The null content must survive request parsing (it used to be dropped, which broke
    templates that read message.content), and the tools reach a template that reads them."""
    from server.schemas import ChatCompletionRequest
    from server.tools import messages_for_template

    source = _template_fields("gemma-4")["tokenizer.chat_template"]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
    ], "tools": tools}
    request = ChatCompletionRequest.model_validate(body)
    messages = request.message_dicts()
    assert messages[1]["content"] is None and messages[1]["tool_calls"][0]["id"] == "c1"
    template = ChatTemplate(source, bos_token="<bos>", eos_token="<eos>")
    assert template.reads_tools
    rendered = template.render(messages_for_template(messages, tools, template.reads_tools), tools=tools)
    reference = copy.deepcopy(body["messages"])
    reference[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = _transformers_render(source, reference, tools=tools, add_generation_prompt=True, bos_token="<bos>",
                                    eos_token="<eos>")
    assert rendered == expected
