"""Tool calling: the output parsers on the formats models are trained to emit, and round trips
through the real server with the real openai client (SmolLM2: forced calls go through the grammar
engine, so even this small model produces calls whose arguments validate against the schema)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from mistralrs_jax.loading.chat_template import DEFAULT_CHATML_TEMPLATE, ChatTemplate
from server.tools import (HERMES, LLAMA3, MISTRAL, ToolStreamFilter, call_format, messages_for_template,
                          parse_tool_calls)

pytest_plugins = ["server_fixtures"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": {"type": "string", "maxLength": 20},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The local time in a timezone",
                 "parameters": {"type": "object", "additionalProperties": False, "required": ["timezone"],
                                "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]{1,14}/[A-Z][a-z]{1,14}$"}}}},
}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _calls(text, fmt):
    content, calls = parse_tool_calls(text, fmt)
    return content, [(call.name, json.loads(call.arguments)) for call in calls]


# ------------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize("text, fmt, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', HERMES, None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>', HERMES,
     "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', HERMES, None,  # EOS before the close tag
     [("get_weather", {"city": "Paris"})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', LLAMA3, None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>', LLAMA3, None,
     [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>brave_search.call(query="weather in Paris")', LLAMA3, None,
     [("brave_search", {"query": "weather in Paris"})]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', MISTRAL, None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', MISTRAL, None, [("get_weather", {"city": "Paris"})]),
])
def test_parsers_read_each_format(text, fmt, content, calls):
    assert _calls(text, fmt) == (content, calls)


@pytest.mark.parametrize("text, fmt", [
    ("It is sunny in Paris.", HERMES), ("<tool_call>not json</tool_call>", HERMES),
    ("The JSON is {broken", LLAMA3), ("[TOOL_CALLS] nothing", MISTRAL),
])
def test_text_without_a_valid_call_stays_content(text, fmt):
    assert parse_tool_calls(text, fmt) == (text, [])


def test_stream_filter_sends_text_before_the_call_and_holds_the_call():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    stream = ToolStreamFilter(HERMES)
    sent = "".join(stream.feed(char) for char in text)
    tail, calls = stream.finish()
    assert sent + tail == "Sure.\n" and [call.name for call in calls] == ["get_weather"]
    plain = ToolStreamFilter(HERMES)
    sent = "".join(plain.feed(char) for char in "a < b, <tool")
    tail, calls = plain.finish()
    assert sent + tail == "a < b, <tool" and not calls


def test_call_format_follows_the_template():
    assert call_format("{{ '[TOOL_CALLS]' + tool_calls | tojson }}") == MISTRAL
    assert call_format("{%- if message.role == 'ipython' %}<|python_tag|>{% endif %}") == LLAMA3
    assert call_format("<tool_call>\\n{{ tool_call | tojson }}\\n</tool_call>") == HERMES
    assert call_format(DEFAULT_CHATML_TEMPLATE) == HERMES


def test_a_template_without_tools_gets_them_and_the_history_in_text():
    """SmolLM2's ChatML template reads no `tools`: the tools go to a system message, an assistant
    turn with tool_calls (content null) becomes <tool_call> text, a tool result a <tool_response>."""
    template = ChatTemplate(DEFAULT_CHATML_TEMPLATE)
    assert not template.reads_tools
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    rendered = template.render(messages_for_template(history, [WEATHER], False))
    assert rendered.startswith("<|im_start|>system\nYou may call these functions.")
    assert json.dumps(WEATHER) in rendered
    assert ('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}</tool_call><|im_end|>') in rendered
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in rendered


# Our own template in the shape of Mistral's tool-calling ones, which raise on a tool-call id that
# is not 9 letters and digits, in an assistant turn's tool_calls and in a tool result alike.
MISTRAL_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}[INST]{{ message.content }}[/INST]"
    "{%- elif message.tool_calls %}[TOOL_CALLS][{%- for call in message.tool_calls %}"
    "{%- if call.id is not defined or call.id | length != 9 %}{{ raise_exception('bad id ' ~ call.id) }}{% endif %}"
    "{\"name\": \"{{ call.function.name }}\", \"id\": \"{{ call.id }}\"}{% endfor %}]</s>"
    "{%- elif message.role == 'tool' %}"
    "{%- if message.tool_call_id | length != 9 %}{{ raise_exception('bad tool_call_id') }}{% endif %}"
    "[TOOL_RESULTS]{\"call_id\": \"{{ message.tool_call_id }}\", \"content\": {{ message.content }}}[/TOOL_RESULTS]"
    "{%- else %}{{ message.content }}</s>{%- endif %}{%- endfor %}"
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | length }}[/AVAILABLE_TOOLS]{% endif %}"
)


def test_mistral_templates_get_nine_character_call_ids():
    """A Mistral-format reply's calls get ids of 9 letters and digits, and a replayed history with
    OpenAI-style ids renders, each call still paired with its result."""
    from server.routes_chat import ToolOutput

    template = ChatTemplate(MISTRAL_LIKE_TEMPLATE)
    assert template.reads_tools and call_format(template.source) == MISTRAL
    message, finish = ToolOutput("auto", MISTRAL).message(
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "stop")
    call_id = message["tool_calls"][0]["id"]
    assert finish == "tool_calls" and len(call_id) == 9 and call_id.isalnum()
    forced, _ = ToolOutput("get_time", MISTRAL).message('{"timezone": "Asia/Tokyo"}', "stop")
    assert len(forced["tool_calls"][0]["id"]) == 9 and forced["tool_calls"][0]["id"].isalnum()

    def history(first_id, second_id):
        return ASK + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": first_id, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                {"id": second_id, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": second_id, "content": "2"},
            {"role": "tool", "tool_call_id": first_id, "content": "1"},
        ]

    with pytest.raises(Exception, match="bad id"):
        template.render(history("call_0123456789abcdef", "call_fedcba9876543210"), tools=[WEATHER])
    rendered = template.render(messages_for_template(history("call_0123456789abcdef", "call_fedcba9876543210"),
                                                     [WEATHER], True, MISTRAL), tools=[WEATHER])
    ids = re.findall(r'"id": "(\w+)"', rendered)
    results = dict(re.findall(r'"call_id": "(\w+)", "content": (\d)', rendered))
    assert len(set(ids)) == 2 and results == {ids[1]: "2", ids[0]: "1"}
    kept = template.render(messages_for_template(history(call_id, "abcDEF123"), [WEATHER], True, MISTRAL),
                           tools=[WEATHER])
    assert re.findall(r'"id": "(\w+)"', kept) == [call_id, "abcDEF123"]


# ------------------------------------------------------------------------------ server round trips


@pytest.mark.slow
def test_forced_tool_call_round_trip(live_server):
    """tool_choice "required": a valid call; then the call and its result replayed give an answer."""
    client = live_server.client()
    reply = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False, temperature=0,
                                           max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    assert history[1]["tool_calls"][0]["id"] == call.id
    answer = client.chat.completions.create(model="default", messages=history, tools=[WEATHER, TIME],
                                            temperature=0, max_tokens=30)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


@pytest.mark.slow
def test_streamed_named_tool_call(live_server):
    """A named function, streamed: one header delta (id, name), then the arguments in pieces, then
    finish_reason "tool_calls", as OpenAI streams them."""
    client = live_server.client()
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0.7, seed=2,
        max_tokens=100, stream=True)  # the schema bounds the arguments (< 50 tokens), so sampling cannot run out
    headers, arguments, finish = [], "", None
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                assert call.index == 0
                if call.id is not None:
                    headers.append((call.id, call.function.name))
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert len(headers) == 1 and headers[0][1] == "get_time" and headers[0][0].startswith("call_")
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_time"])


@pytest.mark.slow
def test_streamed_required_calls_in_parallel_and_tool_choice_none(live_server):
    client = live_server.client()
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Weather in Rome and the time in Rome?"}],
        tools=[WEATHER, TIME], tool_choice="required", temperature=0.8, seed=4, max_tokens=150, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
                entry["name"] = call.function.name or entry["name"]
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])

    plain = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=10)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"


def test_reply_messages_and_parallel_tool_calls_false():
    """A free reply with two calls becomes an OpenAI message with both (finish_reason "tool_calls"), or
    only the first when parallel_tool_calls is false; a forced call's JSON becomes its arguments."""
    from server.routes_chat import ToolOutput

    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Oslo"}}</tool_call>')
    message, finish = ToolOutput("auto", HERMES).message(text, "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    message, _ = ToolOutput("auto", HERMES, parallel=False).message(text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    message, finish = ToolOutput("get_time", HERMES).message('{"timezone": "Asia/Tokyo"}', "stop")
    assert finish == "tool_calls" and message["tool_calls"][0]["function"] == {
        "name": "get_time", "arguments": '{"timezone": "Asia/Tokyo"}'}
    message, finish = ToolOutput("get_time", HERMES).message('{"timezone": "As', "length")
    assert finish == "length" and message == {"role": "assistant", "content": '{"timezone": "As'}
    assert ToolOutput(None, HERMES).message(text, "stop") == ({"role": "assistant", "content": text}, "stop")
