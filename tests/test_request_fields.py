"""No silent no-ops: every field the openai SDK can send is implemented, refused with a 400 naming
it, or knowingly ignored because it changes nothing a client can see (server/schemas.py).

The SDK's own request types are the outside reference for which fields exist; the refusals go
through `parse_request`, the function both chat and completion routes validate bodies with
(the live-server side of the same table is in tests/test_server_errors.py)."""
from __future__ import annotations

import pytest

from server.errors import APIError
from server.schemas import (IGNORED_FIELDS, UNSUPPORTED_FIELDS, ChatCompletionRequest, CompletionRequest,
                            parse_request)

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "default", "prompt": "Hi"}


def _sdk_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsBase.__annotations__) | {"stream"}


@pytest.mark.parametrize("route, model", [("chat", ChatCompletionRequest), ("completions", CompletionRequest)])
def test_every_openai_field_is_implemented_refused_or_knowingly_ignored(route, model):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    sdk = _sdk_fields(chat_create_params if route == "chat" else completion_create_params)
    unaccounted = sdk - set(model.model_fields) - set(UNSUPPORTED_FIELDS) - IGNORED_FIELDS
    assert not unaccounted, f"openai {route} fields with no policy: {sorted(unaccounted)}"
    assert not IGNORED_FIELDS & set(UNSUPPORTED_FIELDS)


REFUSED = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "store": True,
    "service_tier": "flex",
    "verbosity": "low",
    "moderation": {"mode": "on"},
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "guided_json": {"type": "object"},
    "mirostat": 2,
    "typical_p": 0.5,
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_an_unimplemented_field_is_a_400_naming_it(field):
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, {**CHAT, field: REFUSED[field]})
    assert info.value.status == 400 and info.value.param == field and field in info.value.message
    assert info.value.code == "not_supported"


@pytest.mark.parametrize("field, value", [
    ("modalities", ["text"]), ("service_tier", "auto"), ("service_tier", "default"), ("verbosity", "medium"),
    ("store", False), ("user", "u1"), ("metadata", {"k": "v"}), ("prompt_cache_key", "k"),
    ("safety_identifier", "s"), ("prompt_cache_retention", "24h"),
])
def test_values_that_ask_for_nothing_more_are_accepted(field, value):
    parse_request(ChatCompletionRequest, {**CHAT, field: value})


def test_top_logprobs_without_logprobs_is_a_400():
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, {**CHAT, "top_logprobs": 2})
    assert (info.value.status, info.value.param) == (400, "top_logprobs")


def test_completions_refuse_what_they_do_not_implement():
    for field, value in (("suffix", "x"), ("best_of", 3)):
        with pytest.raises(APIError) as info:
            parse_request(CompletionRequest, {**COMPLETION, field: value})
        assert info.value.status == 400 and field in info.value.message
