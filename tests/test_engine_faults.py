"""Faults injected into the real engine behind the real server (default model, loopback):
an exception in the model step, in the sampler, or in the detokenizer. Only the requests
it touches fail, with a 500 carrying an OpenAI error body; their KV blocks are freed; the
engine goes on serving and /health stays 200."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from mistralrs_jax.loading.detokenizer import IncrementalDetokenizer

pytest_plugins = ["server_fixtures"]

PROMPT = {"model": "default", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8}


class InjectedFault(RuntimeError):
    pass


def _fail_once(real):
    """`real` that raises InjectedFault on its first call, then behaves."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise InjectedFault("injected fault")
        return real(*args, **kwargs)

    return wrapper


def _wait_idle(llm, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := llm.engine.stats())["kv_blocks_used"] or stats["requests"]:
        assert time.monotonic() < deadline, f"not idle: {stats['requests']}, {stats['kv_blocks_used']} blocks used"
        time.sleep(0.05)
    return stats


def _assert_server_error(response: httpx.Response) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "InjectedFault" in error["message"] and "injected fault" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def _assert_still_serving(live_server) -> None:
    with live_server.http() as http:
        assert http.get("/health").json() == {"status": "ok", "model": live_server.llm.model_name}
        answer = http.post("/v1/chat/completions", json=PROMPT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
    _wait_idle(live_server.llm)


@pytest.mark.parametrize("part", ["_step_fn", "_sample_fn"], ids=["model_step", "sampler"])
def test_a_fault_in_the_step_fails_its_request_with_500(live_server, monkeypatch, part):
    llm = live_server.llm
    before = _wait_idle(llm)
    runner = llm.engine.runner
    monkeypatch.setattr(runner, part, _fail_once(getattr(runner, part)))
    with live_server.http() as http:
        _assert_server_error(http.post("/v1/chat/completions", json=PROMPT))
    after = _wait_idle(llm)
    assert after["requests_failed"] == before["requests_failed"] + 1
    _assert_still_serving(live_server)


def test_a_fault_mid_stream_ends_the_stream_with_an_error_event(live_server, monkeypatch):
    llm = live_server.llm
    _wait_idle(llm)
    runner = llm.engine.runner
    real = runner._sample_fn
    calls = {"n": 0}

    def third_call_fails(*args, **kwargs):  # after the prefill and one decode step
        calls["n"] += 1
        if calls["n"] == 3:
            raise InjectedFault("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_sample_fn", third_call_fails)
    events = []
    with live_server.http() as http, http.stream("POST", "/v1/chat/completions",
                                                 json={**PROMPT, "stream": True, "ignore_eos": True}) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert any(event.get("choices") and event["choices"][0]["delta"].get("content") for event in events)
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    _wait_idle(llm)
    _assert_still_serving(live_server)


def test_a_detokenizer_fault_fails_only_its_request(live_server, monkeypatch):
    """Two requests in flight together; the detokenizer fails on one: the other completes."""
    llm = live_server.llm
    _wait_idle(llm)
    poisoned = llm.tokenizer.encode("A poisoned prompt about rivers", add_special_tokens=True)
    real_push = IncrementalDetokenizer.push

    def push(self, token_id):
        if self.ids[:len(poisoned)] == poisoned:
            raise InjectedFault("injected fault")
        return real_push(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "push", push)
    healthy_result: dict = {}

    def healthy() -> None:
        with live_server.http() as http:
            healthy_result["response"] = http.post(
                "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 40, "ignore_eos": True})

    thread = threading.Thread(target=healthy)
    thread.start()
    deadline = time.monotonic() + 60
    while not llm.engine.stats()["requests"]:  # the healthy request is in the engine
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with live_server.http() as http:
        failed = http.post("/v1/completions", json={"prompt": poisoned, "max_tokens": 40, "ignore_eos": True})
    thread.join(120)
    _assert_server_error(failed)
    ok = healthy_result["response"]
    assert ok.status_code == 200, ok.text
    choice = ok.json()["choices"][0]
    assert choice["finish_reason"] == "length" and ok.json()["usage"]["completion_tokens"] == 40
    _wait_idle(llm)
    monkeypatch.undo()
    _assert_still_serving(live_server)


class LoopKilled(BaseException):
    """Not an Exception: it passes the loop's `except Exception` and ends the loop thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_health_answers_503_once_the_engine_loop_itself_died(live_server, monkeypatch):
    """The faults above leave /health at 200; only a dead loop thread turns it to 503."""
    llm = live_server.llm
    engine = llm.engine
    _wait_idle(llm)
    loop_thread = engine._thread
    assert loop_thread is not None and loop_thread.is_alive()

    def die() -> bool:
        raise LoopKilled("the engine loop was killed by the test")

    # A request in flight when the loop dies must end (a 500 naming the cause), not wait forever.
    in_flight: dict = {}
    long_prompt = {**PROMPT, "max_tokens": 400, "ignore_eos": True}

    def send() -> None:
        with live_server.http() as http:
            in_flight["response"] = http.post("/v1/chat/completions", json=long_prompt, timeout=120)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while not engine.stats()["requests"]:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.01)
    monkeypatch.setattr(engine, "_apply_commands", die)  # the loop calls it at the top of every turn
    engine._wakeup.set()
    loop_thread.join(30)
    assert not loop_thread.is_alive()
    sender.join(60)
    assert not sender.is_alive(), "a request in flight waited on a dead engine loop"
    response = in_flight["response"]
    assert response.status_code == 500, response.text
    assert "killed by the test" in response.json()["error"]["message"]
    try:
        with live_server.http() as http:
            health = http.get("/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "error" and "not running" in health.json()["detail"]
    finally:
        monkeypatch.undo()
        engine._thread = None  # a fresh loop thread for the tests that follow
        engine.start()
    _assert_still_serving(live_server)
