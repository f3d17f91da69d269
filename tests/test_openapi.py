"""GET /openapi.json, and schemathesis driving the real server (default model, on loopback)
with requests generated from that document: no 5xx, every answer as the document says."""
from __future__ import annotations

import json
import logging

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

pytest_plugins = ["server_fixtures"]

log = logging.getLogger(__name__)

# Generated requests per operation (a fixed seed, so every run sends the same ones).
EXAMPLES = {"POST /v1/chat/completions": 160, "POST /v1/completions": 160}
OTHER_EXAMPLES = 15
MAX_GENERATED_TOKENS = 3  # generation is real; keep each request short
MAX_N = 2
# POST /v1/re_isq re-quantizes the served model (every test shares it): it is described, not fuzzed.
NOT_FUZZED = {"POST /v1/re_isq"}


def _document(live_server) -> dict:
    response = httpx.get(f"{live_server.url}/openapi.json", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def test_openapi_is_valid_and_covers_every_route(live_server, server_llm):
    from openapi_spec_validator import validate

    from server.app import create_app

    document = _document(live_server)
    validate(document)
    app = create_app(server_llm)
    served = {(str(rule.rule).replace("<path:model_id>", "{model_id}"), method.lower())
              for rule in app.url_map.iter_rules() for method in rule.methods
              if method not in ("HEAD", "OPTIONS") and rule.endpoint != "static" and rule.rule != "/openapi.json"}
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == described


def test_request_schemas_are_the_models_the_server_validates_with(live_server):
    from server.openapi import REF
    from server.schemas import ChatCompletionRequest, CompletionRequest

    schemas = _document(live_server)["components"]["schemas"]
    for model in (ChatCompletionRequest, CompletionRequest):
        generated = model.model_json_schema(by_alias=True, ref_template=REF)
        for name, sub in generated.pop("$defs", {}).items():
            assert schemas[name] == sub
        assert schemas[model.__name__] == generated
    chat = _document(live_server)["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]) >= {"200", "400", "413", "500", "503"}


def _shorten(body: object) -> None:
    """Generation is real: cap the tokens and choices a generated request asks for."""
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if not isinstance(body.get(name), int) or isinstance(body.get(name), bool) or body[name] > MAX_GENERATED_TOKENS:
            body[name] = MAX_GENERATED_TOKENS
    for name in ("n", "best_of"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_N:
            body[name] = MAX_N


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_nonconforming_answer(live_server):
    import schemathesis
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                     response_schema_conformance, status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    tried: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = operation.label
        if label in NOT_FUZZED:
            continue
        examples = EXAMPLES.get(label, OTHER_EXAMPLES)

        @seed(20261207)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case) -> None:
            _shorten(case.body)
            tried[label] = tried.get(label, 0) + 1
            response = case.call(base_url=live_server.url, timeout=120)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            try:
                case.validate_response(response, checks=checks)
            except BaseException as exc:  # collected: one report naming every failing request
                body = json.dumps(case.body)[:300] if case.body is not None else ""
                failures.append(f"{label} {body} -> {response.status_code} {response.text[:300]}: "
                                f"{str(exc)[:400]}")

        run()
    log.info("schemathesis: %s requests tried, statuses %s", tried, statuses)
    print(f"schemathesis: {sum(tried.values())} generated requests {tried}, statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    assert sum(tried.values()) >= 300
    assert not any(status >= 500 for status in statuses)


def test_the_document_needs_no_api_key_and_lists_the_401(keyed_server):
    document = httpx.get(f"{keyed_server.url}/openapi.json", timeout=30)
    assert document.status_code == 200  # published like /health: clients read it before they have a key
    assert "401" in document.json()["paths"]["/v1/chat/completions"]["post"]["responses"]
    refused = httpx.post(f"{keyed_server.url}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
