"""Bad requests get OpenAI-shaped 4xx answers and the server keeps serving; the API key is enforced.

Expected statuses and the error body shape follow OpenAI's API reference
(`{"error": {"message", "type", "param", "code"}}`), and the `openai` client's own mapping
of statuses to exception classes checks that the answers read as OpenAI's do.
"""
from __future__ import annotations

import http.client
import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow
pytest_plugins = ["server_fixtures"]

OK_MESSAGES = [{"role": "user", "content": "Say hello."}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**fields):
    return {"model": "default", "messages": OK_MESSAGES, "max_tokens": 2, **fields}


def completion(**fields):
    return {"model": "default", "prompt": "Hello", "max_tokens": 2, **fields}


# (case, method, path, body: dict | bytes | None, status, expected param or None for "any")
MALFORMED = [
    ("invalid JSON", "POST", CHAT, b'{"messages": [', 400, None),
    ("empty body", "POST", CHAT, b"", 400, None),
    ("body is a JSON array", "POST", CHAT, b"[1, 2]", 400, None),
    ("body is not UTF-8", "POST", CHAT, b"\x80\x81\x82", 400, None),
    ("missing messages", "POST", CHAT, {"model": "default"}, 400, "messages"),
    ("messages is a string", "POST", CHAT, chat(messages="hello"), 400, "messages"),
    ("messages is empty", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("message without a role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    ("content is a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400,
     "messages[0].content"),
    ("image content for a text-only model", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
     400, "messages"),
    ("temperature is a string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("temperature below 0", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("top_p of 0", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_k below -1", "POST", CHAT, chat(top_k=-5), 400, "top_k"),
    ("min_p above 1", "POST", CHAT, chat(min_p=1.5), 400, "min_p"),
    ("max_tokens of 0", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens is a float", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("n of 0", "POST", CHAT, chat(n=0), 400, "n"),
    ("presence_penalty above 2", "POST", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("repetition_penalty of 0", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("stop is a number", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("logit_bias key is not a token id", "POST", CHAT, chat(logit_bias={"hello": 1}), 400, "logit_bias"),
    ("logit_bias value above 100", "POST", CHAT, chat(logit_bias={"5": 500}), 400, "logit_bias"),
    ("logit_bias token outside the vocabulary", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs above 20", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("stream is a string", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("seed is a string", "POST", CHAT, chat(seed="42"), 400, "seed"),
    ("a tool without a name", "POST", CHAT, chat(tools=[{"type": "function", "function": {"parameters": {}}}]), 400,
     "tools[0].function.name"),
    ("tool_choice names an unknown function", "POST", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice"),
    ("tool_choice required without tools", "POST", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("unknown response_format type", "POST", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type"),
    ("json_schema response_format without a schema", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "response_format.json_schema.schema"),
    ("a schema with an unknown type", "POST", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}), 400,
     "response_format.json_schema.schema"),
    ("a regex grammar that does not compile", "POST", CHAT, chat(grammar={"type": "regex", "value": "a(b"}), 400,
     "grammar"),
    ("a lark grammar that does not compile", "POST", CHAT, chat(grammar={"type": "lark", "value": "start: x"}), 400,
     "grammar"),
    ("unknown grammar type", "POST", CHAT, chat(grammar={"type": "ebnf", "value": "x"}), 400, "grammar.type"),
    ("grammar and response_format together", "POST", CHAT,
     chat(grammar={"type": "regex", "value": "a+"}, response_format={"type": "json_object"}), 400, "grammar"),
    ("a grammar on completions that does not compile", "POST", COMPLETIONS,
     completion(grammar={"type": "regex", "value": "(("}), 400, "grammar"),
    ("reasoning_effort for a template without it", "POST", CHAT, chat(reasoning_effort="high"), 400,
     "reasoning_effort"),
    ("dry_multiplier below 0", "POST", CHAT, chat(dry_multiplier=-1), 400, "dry_multiplier"),
    ("dry_base below 1", "POST", CHAT, chat(dry_multiplier=0.8, dry_base=0.5), 400, "dry_base"),
    ("dry_allowed_length of 0", "POST", CHAT, chat(dry_multiplier=0.8, dry_allowed_length=0), 400,
     "dry_allowed_length"),
    ("unimplemented: mirostat", "POST", CHAT, chat(mirostat=2), 400, "mirostat"),
    ("unimplemented: vLLM guided_json", "POST", CHAT, chat(guided_json={"type": "object"}), 400, "guided_json"),
    ("unimplemented: audio output", "POST", CHAT, chat(modalities=["text", "audio"]), 400, "modalities"),
    ("unimplemented: typical_p on completions", "POST", COMPLETIONS, completion(typical_p=0.5), 400, "typical_p"),
    ("chat_template_kwargs may not set messages", "POST", CHAT, chat(chat_template_kwargs={"messages": []}), 400,
     "chat_template_kwargs.messages"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), 404, "model"),
    ("missing prompt", "POST", COMPLETIONS, {"model": "default"}, 400, "prompt"),
    ("empty prompt list", "POST", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("prompt of mixed types", "POST", COMPLETIONS, completion(prompt=["a", [1, 2]]), 400, "prompt"),
    ("prompt token outside the vocabulary", "POST", COMPLETIONS, completion(prompt=[1, 2, 10**9]), 400, "prompt"),
    ("legacy logprobs above 20", "POST", COMPLETIONS, completion(logprobs=50), 400, "logprobs"),
    ("suffix is not supported", "POST", COMPLETIONS, completion(suffix="end"), 400, None),
    ("unknown model on completions", "POST", COMPLETIONS, completion(model="davinci-002"), 404, "model"),
    ("unknown route", "POST", "/v1/embeddings-and-more", chat(), 404, None),
    ("unknown route outside /v1", "GET", "/index.html", None, 404, None),
    ("GET on a POST route", "GET", CHAT, None, 405, None),
    ("POST on a GET route", "POST", "/v1/models", {}, 405, None),
    ("unknown model id", "GET", "/v1/models/not-this-one", None, 404, "model"),
    ("re_isq with an unknown ISQ type", "POST", "/v1/re_isq", {"ggml_type": "Q9K"}, 400, "isq_type"),
    ("re_isq without an ISQ type", "POST", "/v1/re_isq", {"model": "default"}, 400, "isq_type"),
    ("image generation is not available", "POST", "/v1/images/generations", {"prompt": "a cat"}, 400, None),
]


def assert_error_body(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(live_server):
    assert len(MALFORMED) >= 20
    failures = []
    with live_server.http() as http:
        for case, method, path, body, status, param in MALFORMED:
            kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
            response = http.request(method, path, **kwargs)
            try:
                assert_error_body(response, status, param)
            except AssertionError as exc:
                failures.append(f"{case}: {exc}")
    assert not failures, "\n".join(failures)
    reply = live_server.client().chat.completions.create(model="default", messages=OK_MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1


def test_an_error_answered_before_the_body_is_read_keeps_the_connection(live_server):
    """A 404/405 is decided before the body is read; the server still reads the body, so a keep-alive
    client's next request on the same connection is answered (not "server disconnected")."""
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 400_000}]}).encode()
    host, port = live_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for method, path in (("POST", "/v1/embeddings-and-more"), ("POST", "/v1/models"), ("PUT", CHAT)):
            connection.request(method, path, body=big, headers={"Content-Type": "application/json"})
            first = connection.getresponse()
            assert first.status in (404, 405) and json.loads(first.read())["error"]["message"]
            sock = connection.sock
            time.sleep(0.3)  # time for a close to arrive, were the server to close
            connection.request("GET", "/v1/models")
            second = connection.getresponse()
            assert second.status == 200 and json.loads(second.read())["data"]
            assert connection.sock is sock, "the server closed the keep-alive connection"
    finally:
        connection.close()


def test_error_messages_say_what_to_fix(live_server):
    with live_server.http() as http:
        error = assert_error_body(http.post(CHAT, json=chat(temperature="hot")), 400, "temperature")
        assert "number" in error["message"] and "'hot'" in error["message"]
        error = assert_error_body(http.post(CHAT, json=chat(model="gpt-4o")), 404, "model")
        assert error["code"] == "model_not_found" and live_server.llm.model_name in error["message"]
        error = assert_error_body(http.post(COMPLETIONS, json=completion(prompt=5)), 400, "prompt")
        assert "list[int]" in error["message"]
        error = assert_error_body(http.put(CHAT, json=chat()), 405, None)
        assert "POST" in error["message"]
        error = assert_error_body(http.post("/v1/re_isq", json={}), 400, "isq_type")
        assert '{"isq_type": "Q4K"}' in error["message"]
        error = assert_error_body(http.post("/v1/re_isq", json={"isq_type": "afq4"}), 400, None)
        assert "Metal" in error["message"] and error["code"] == "not_supported"


def test_the_default_model_name_and_a_missing_model_are_accepted(live_server):
    with live_server.http() as http:
        for model in ("default", live_server.llm.model_name, None):
            body = chat()
            if model is None:
                del body["model"]
            else:
                body["model"] = model
            assert http.post(CHAT, json=body).status_code == 200, model


def test_prompt_too_long_is_a_400_with_context_length_code(live_server):
    max_len = live_server.llm.max_model_len
    too_long = "word " * (max_len + 100)
    with live_server.http() as http:
        error = assert_error_body(http.post(COMPLETIONS, json=completion(prompt=too_long)), 400, "prompt")
        assert error["code"] == "context_length_exceeded" and str(max_len) in error["message"]
        error = assert_error_body(http.post(CHAT, json=chat(messages=[{"role": "user", "content": too_long}])), 400,
                                  "messages")
        assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        live_server.client().completions.create(model="default", prompt=too_long, max_tokens=2)
    assert live_server.client().completions.create(model="default", prompt="Hi", max_tokens=2).choices


def test_truncate_sequence_serves_a_too_long_prompt_and_seed_sets_the_default(lenient_server):
    llm = lenient_server.llm
    client = lenient_server.client()
    context = min(llm.max_model_len, llm.block_manager.num_token_slots)
    too_long = "word " * (context + 100)
    # mistral.rs' rule: keep the prompt's end, leaving max_tokens of room in the context.
    stream = client.completions.create(model="default", prompt=too_long, max_tokens=context - 24, temperature=0,
                                       stream=True)
    first = next(iter(stream))
    assert first.choices and first.choices[0].text is not None
    stream.close()  # no need to wait for thousands of tokens: the prompt length is in the request log
    records = []
    for _ in range(100):
        records = [json.loads(line) for line in lenient_server.request_log.read_text().splitlines()]
        if records:
            break
        time.sleep(0.05)
    assert records[-1]["prompt_tokens"] == 24 and records[-1]["status"] == 499  # 499: the client left

    from mistralrs_jax import SamplingParams

    unseeded = [client.chat.completions.create(model="default", messages=OK_MESSAGES, temperature=1.0,
                                               max_tokens=8).choices[0].message.content for _ in range(2)]
    expected = llm.chat(OK_MESSAGES, SamplingParams(temperature=1.0, max_tokens=8, seed=1234))[0].outputs[0].text
    assert unseeded == [expected, expected]


def test_body_too_large_is_a_413(small_body_server):
    limit = small_body_server.max_body_bytes
    big = chat(messages=[{"role": "user", "content": "x" * (2 * limit)}])
    with small_body_server.http() as http:
        error = assert_error_body(http.post(CHAT, content=json.dumps(big).encode(),
                                            headers={"content-type": "application/json"}), 413, None)
        assert str(limit) in error["message"]
        assert http.post(CHAT, json=chat()).status_code == 200  # the server is still there


def test_openai_client_sees_openai_exception_classes(live_server):
    client = live_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=OK_MESSAGES, temperature=-3)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=OK_MESSAGES)
    with pytest.raises(openai.BadRequestError):  # an error before the stream starts is a plain 4xx
        client.chat.completions.create(model="default", messages=OK_MESSAGES, top_p=5, stream=True)


def test_api_key_is_enforced(keyed_server):
    api_key = keyed_server.api_key
    with keyed_server.http() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api_key},
                        {"Authorization": f"Basic {api_key}"}):
            for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/status")):
                response = http.request(method, path, json=chat() if method == "POST" else None, headers=headers)
                error = assert_error_body(response, 401, None)
                assert error["code"] == "invalid_api_key" and "--api-key" in error["message"]
                assert response.headers["www-authenticate"] == "Bearer"
        assert http.get("/health").status_code == 200  # open for load-balancer probes
        good = {"Authorization": f"Bearer {api_key}"}
        assert http.get("/metrics", headers=good).status_code == 200
        assert http.get("/v1/status", headers=good).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").models.list()
    reply = keyed_server.client().chat.completions.create(model="default", messages=OK_MESSAGES, max_tokens=3)
    assert reply.choices[0].message.content


def test_a_busy_port_is_a_clear_startup_error(live_server):
    from server.serving import ServerStartError, bind_socket

    port = int(live_server.url.rsplit(":", 1)[1])
    with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
        bind_socket("127.0.0.1", port)
