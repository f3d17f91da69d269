"""Constrained output through the real server and the real openai client: response_format json_schema /
json_object, mistral.rs' `grammar` field, the openai SDK's `parse` with a pydantic model.

Every constrained output is checked by `jsonschema` (or `re`), the outside judge of what the grammar
must guarantee. The engine applies the grammar as a fixed-shape token bitmask, so constrained and
free requests share a batch, nothing compiles after warm-up, and free requests are untouched.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pydantic
import pytest

pytestmark = pytest.mark.slow
pytest_plugins = ["server_fixtures"]

ASK = [{"role": "user", "content": "Describe a person in JSON."}]

SCHEMAS = {
    "nested objects": {
        "type": "object", "additionalProperties": False, "required": ["name", "address"],
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                   "properties": {"city": {"type": "string", "maxLength": 12},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}},
    },
    "array with min and max items, enum items": {
        "type": "object", "additionalProperties": False, "required": ["colors"],
        "properties": {"colors": {"type": "array", "minItems": 2, "maxItems": 3,
                                  "items": {"enum": ["red", "green", "blue"]}}},
    },
    "integer range and enum": {
        "type": "object", "additionalProperties": False, "required": ["age", "role"],
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "role": {"type": "string", "enum": ["admin", "user", "guest"]}},
    },
    "string pattern": {
        "type": "object", "additionalProperties": False, "required": ["id", "email"],
        "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
    },
    "anyOf with null": {
        "type": "object", "additionalProperties": False, "required": ["nickname", "score"],
        "properties": {"nickname": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
                       "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 10}, {"type": "null"}]}},
    },
    "top-level array of objects": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "additionalProperties": False, "required": ["ok"],
                  "properties": {"ok": {"type": "boolean"}}}},
}


def _json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": re.sub(r"\W", "_", name), "schema": schema, "strict": True}}


def test_constrained_outputs_validate_against_their_schemas(live_server):
    """Every schema, greedy and sampled (n=2), all in flight at once: 100% of the outputs validate."""
    client = live_server.client()

    def ask(item):
        name, schema = item
        reply = client.chat.completions.create(model="default", messages=ASK, max_tokens=120, temperature=0.9,
                                               seed=7, n=2, response_format=_json_schema_format(name, schema))
        greedy = client.chat.completions.create(model="default", messages=ASK, max_tokens=120, temperature=0,
                                                response_format=_json_schema_format(name, schema))
        return name, schema, reply.choices + greedy.choices

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(ask, SCHEMAS.items()))
    for name, schema, choices in results:
        for choice in choices:
            assert choice.finish_reason == "stop", (name, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_streaming(live_server):
    client = live_server.client()
    short = [{"role": "user", "content": "Reply with a JSON object holding a name and an age, nothing else."}]
    reply = client.chat.completions.create(model="default", messages=short, max_tokens=120, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = SCHEMAS["integer range and enum"]
    chunks = list(client.chat.completions.create(model="default", messages=ASK, max_tokens=80, temperature=0.7,
                                                 seed=3, stream=True,
                                                 response_format=_json_schema_format("s", schema)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_openai_parse_with_a_pydantic_model(live_server):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        population: int = pydantic.Field(ge=0, le=10**8)
        landmarks: list[str] = pydantic.Field(max_length=2)

    client = live_server.client()
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(model="default", messages=[{"role": "user", "content": "Tell me about Paris."}],
                       response_format=City, max_tokens=150, temperature=0)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City)
    City.model_validate_json(completion.choices[0].message.content)


def test_grammar_field_regex_lark_and_completions(live_server):
    """mistral.rs' `grammar`, each of its types: a regex, a Lark grammar, a JSON schema and an
    llguidance grammar (as an object and as its JSON text) on chat, a regex on /v1/completions."""
    client = live_server.client()
    regex = r"(yes|no), because [a-z ]{5,40}\."
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Is the sky blue?"}],
                                           max_tokens=40, temperature=0.8, seed=1, n=2,
                                           extra_body={"grammar": {"type": "regex", "value": regex}})
    for choice in reply.choices:
        assert re.fullmatch(regex, choice.message.content), choice.message.content
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=20, temperature=0,
                                           extra_body={"grammar": {"type": "lark", "value": lark}})
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", reply.choices[0].message.content)
    schema = SCHEMAS["integer range and enum"]
    reply = client.chat.completions.create(model="default", messages=ASK, max_tokens=60, temperature=0.8, seed=2,
                                           extra_body={"grammar": {"type": "json_schema", "value": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    own_format = {"grammars": [{"lark_grammar": 'start: "Score: " /[1-5]/ "/5"'}]}  # llguidance's own JSON format
    for value in (own_format, json.dumps(own_format)):
        reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Rate Rome."}],
                                               max_tokens=20, temperature=0.8, seed=3,
                                               extra_body={"grammar": {"type": "llguidance", "value": value}})
        assert re.fullmatch(r"Score: [1-5]/5", reply.choices[0].message.content), reply.choices[0].message.content
    completion = client.completions.create(model="default", prompt="My phone number is", max_tokens=20, temperature=0,
                                           extra_body={"grammar": {"type": "regex", "value": r" [0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", completion.choices[0].text)
    assert completion.choices[0].finish_reason == "stop"


def test_stop_strings_and_prefix_cache_with_a_constraint(live_server):
    """A stop string cuts constrained output as usual; the same greedy request again (its prompt now
    served from the prefix cache) gives the same tokens."""
    client = live_server.client()
    fmt = _json_schema_format("s", SCHEMAS["nested objects"])
    first = client.chat.completions.create(model="default", messages=ASK, max_tokens=100, temperature=0,
                                           response_format=fmt)
    again = client.chat.completions.create(model="default", messages=ASK, max_tokens=100, temperature=0,
                                           response_format=fmt)
    assert again.choices[0].message.content == first.choices[0].message.content
    cut = client.chat.completions.create(model="default", messages=ASK, max_tokens=100, temperature=0,
                                         response_format=fmt, stop=['"address"'])
    assert cut.choices[0].finish_reason == "stop"
    assert first.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert '"address"' not in cut.choices[0].message.content


def test_free_requests_batched_with_constrained_ones_are_unchanged(f32_server):
    """Unconstrained greedy requests give the same tokens whether they run alone or in a batch with
    constrained requests (the all-ones mask rows leave their logits alone). On f32 weights, where
    batched == alone holds exactly (see f32_server)."""
    client = f32_server.client()
    free_prompts = [[{"role": "user", "content": text}] for text in
                    ("Name three fruits.", "What is the capital of Italy?", "Write a haiku about rain.")]

    def free(messages):
        return client.chat.completions.create(model="default", messages=messages, max_tokens=16,
                                              temperature=0).choices[0].message.content

    alone = [free(messages) for messages in free_prompts]

    def constrained(index):
        return client.chat.completions.create(
            model="default", messages=ASK, max_tokens=60, temperature=0.8, seed=index,
            response_format=_json_schema_format("s", SCHEMAS["string pattern"])).choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        constrained_futures = [pool.submit(constrained, i) for i in range(3)]
        free_futures = [pool.submit(free, messages) for messages in free_prompts]
        batched = [f.result() for f in free_futures]
        for future in constrained_futures:
            jsonschema.validate(json.loads(future.result()), SCHEMAS["string pattern"])
    assert batched == alone


def test_no_compiles_after_warm_up_with_constraints(live_server):
    client = live_server.client()
    before = live_server.metrics()["mistralrs_xla_compiles_total"]
    fmt = _json_schema_format("s", SCHEMAS["array with min and max items, enum items"])
    client.chat.completions.create(model="default", messages=ASK, max_tokens=40, temperature=0, response_format=fmt)
    list(client.chat.completions.create(model="default", messages=ASK, max_tokens=40, temperature=0.7, n=3,
                                        stream=True, response_format=fmt, logprobs=True, top_logprobs=2))
    client.chat.completions.create(model="default", messages=ASK, max_tokens=30, temperature=0.9, top_p=0.9,
                                   presence_penalty=0.5, extra_body={"grammar": {"type": "regex", "value": "[a-z ]+"},
                                                                     "dry_multiplier": 0.8})
    assert live_server.metrics()["mistralrs_xla_compiles_total"] == before


def test_the_mask_is_filled_while_the_device_runs_the_forward(server_llm):
    """The host fills a step's grammar mask between dispatching the step's forward and its sampling:
    the forward's logits are still being computed when the fill ends (an async dispatch, so the
    fill costs no step time). Checked on the real engine by watching the logits' readiness."""
    from mistralrs_jax import SamplingParams
    from mistralrs_jax.guidance import GuidedDecoding

    runner = server_llm.engine.runner
    step_fn, token_bitmask = runner._step_fn, runner._token_bitmask
    last_logits, overlapped = [], []

    def watched_step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        last_logits[:] = [out[0]]
        return out

    def watched_mask(seq_ids, num_rows, constraints=None):
        mask = token_bitmask(seq_ids, num_rows, constraints)
        if constraints is not None and constraints.active:
            overlapped.append(not last_logits[0].is_ready())
        return mask

    ids, _ = server_llm.chat_prompt_ids(ASK)
    schema = {"type": "array", "minItems": 50, "items": {"type": "integer"}}  # cannot finish within 24 tokens
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=24,
                            guided_decoding=GuidedDecoding("json_schema", schema))
    runner._step_fn, runner._token_bitmask = watched_step, watched_mask
    try:
        for handle in [server_llm.engine.add_request(ids, params) for _ in range(4)]:
            assert handle.result().outputs[0].finish_reason == "length"
    finally:
        runner._step_fn, runner._token_bitmask = step_fn, token_bitmask
    assert len(overlapped) >= 24 and sum(overlapped) >= 0.9 * len(overlapped), overlapped


def test_speculative_decoding_refuses_a_constraint_and_dry(smollm2_gguf_path):
    """A draft model verifies without the mask, so a constrained request is refused up front (a 400
    through the server), before anything runs. No warm-up: nothing is compiled here."""
    from mistralrs_jax import LLM, SamplingParams
    from mistralrs_jax.errors import NotSupportedError
    from mistralrs_jax.guidance import GuidedDecoding

    llm = LLM(smollm2_gguf_path, draft_model=smollm2_gguf_path, warmup=False, max_seqs=4, pa_ctxt_len=1024)
    try:
        with pytest.raises(NotSupportedError, match="speculative decoding"):
            llm.engine.add_request([1, 2, 3], SamplingParams(guided_decoding=GuidedDecoding("regex", "a+")))
        with pytest.raises(NotSupportedError, match="dry_multiplier"):  # DRY is not applied when verifying either
            llm.engine.add_request([1, 2, 3], SamplingParams(dry_multiplier=0.8))
        assert _post_through_the_app(llm, response_format={"type": "json_object"}) == (
            400, "response_format", "speculative decoding")
        assert _post_through_the_app(llm, tools=[{"type": "function", "function": {"name": "f"}}],
                                     tool_choice="required") == (400, "tool_choice", "speculative decoding")
    finally:
        llm.shutdown()


def _post_through_the_app(llm, **fields) -> tuple[int, str, str]:
    """POST one chat request through the server's app (in-process); (status, message start, reason)."""
    import asyncio

    from server.app import create_app

    async def post():
        app = create_app(llm)
        async with app.test_app() as test_app:
            response = await test_app.test_client().post("/v1/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields})
            return response.status_code, (await response.get_json())["error"]["message"]

    status, message = asyncio.run(post())
    return status, message.split(":")[0], "speculative decoding" if "speculative decoding" in message else message


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2", "falcon"])
def test_llguidance_reads_the_tokenizers_the_engine_rebuilds(name):
    """The grammar engine sees the same bytes our tokenizer makes, for byte-level BPE and SentencePiece
    vocabularies rebuilt from llama.cpp's vocab GGUFs: a matching text, tokenized by us, is accepted
    token by token, and a text that breaks the pattern is refused at the first bad token."""
    import _vocab_fixtures as fixtures

    from mistralrs_jax.guidance import ConstraintTracker, GuidedDecoding
    from mistralrs_jax.loading.gguf import read_gguf_metadata
    from mistralrs_jax.loading.tokenizer import Tokenizer

    try:
        path = fixtures.vocab_gguf(name)
    except fixtures.ReferenceUnavailable as exc:
        pytest.skip(f"llama.cpp vocab files unavailable: {exc}")
    tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(str(path)))
    tracker = ConstraintTracker(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    pattern = r' ?Réponse: \{"ville": "[^"]+", "n": [0-9]+\} 日本'
    text = 'Réponse: {"ville": "Zürich", "n": 42} 日本'
    ids = tokenizer.encode(text, add_special_tokens=False)
    matcher = tracker.compile(GuidedDecoding("regex", pattern), 1)[0]
    assert matcher.consume_tokens(ids), matcher.get_error()
    assert matcher.is_accepting()
    bad = tracker.compile(GuidedDecoding("regex", pattern), 1)[0]
    assert not bad.consume_tokens(tokenizer.encode(text.replace("42", "x"), add_special_tokens=False))
