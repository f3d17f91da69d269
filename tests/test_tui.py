"""The Textual dashboard, driven by Textual's Pilot against a live in-process server on the
default model (the shared session server of tests/server_fixtures.py).

Screenshots (SVG) go to tests/_artifacts/ for people to look at; the assertions read the
widgets and the server's own counters.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import jax

from tui.app import DashboardApp, HelpScreen
from tui.chat import ChatPane
from tui.client import ChatSettings
from tui.view import parse_prometheus

pytest_plugins = ["server_fixtures"]

ARTIFACTS = Path(__file__).parent / "_artifacts"
SIZE = (140, 44)


def _text(app: DashboardApp, selector: str) -> str:
    return str(app.query_one(selector).content)


async def _until(pilot, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await pilot.pause(0.05)


def _table_rows(app: DashboardApp) -> list[list[str]]:
    table = app.query_one("#requests")
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def _stream_until(url: str, stop: threading.Event) -> None:
    """Stream a long completion until `stop` is set, then hang up (the server aborts it)."""
    body = {"prompt": "The history of the printing press", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        for _ in response.iter_lines():
            if stop.is_set():
                return


def test_dashboard_watches_a_generation_and_chats(f32_server):
    """Scheduler/KV panels follow a generation in flight; the chat streams a reply equal to the
    server's own (greedy) answer to the same conversation; help, resize and quit work. On the f32
    server: the chat reply is batched with a background generation, and the claim is exact token
    equality across batch compositions (see f32_server)."""
    ARTIFACTS.mkdir(exist_ok=True)
    settings = ChatSettings(temperature=0.0, top_p=1.0, max_tokens=24)
    app = DashboardApp(f32_server.url, poll_interval=0.2, memory_from_this_process=True, chat_settings=settings)
    aborted_before = f32_server.status()["metrics"]["requests_aborted"]
    first_reply: list[str] = []

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await _until(pilot, lambda: app.polls >= 1, 30, "the first poll")
            assert f32_server.llm.model_name in app.title
            memory = _text(app, "#memory")
            assert ("process RSS" in memory) if jax.default_backend() == "cpu" else ("device memory" in memory)

            # A generation from another client: the scheduler shows it running, the KV cache fills.
            # It is long (and stopped by closing the stream) so that even a fast device is still
            # generating when the dashboard polls.
            stop_background = threading.Event()
            background = threading.Thread(target=_stream_until, args=(f32_server.url, stop_background))
            background.start()
            try:
                await _until(pilot, lambda: (app.view.running or 0) >= 1, 60, "the request to show as running")
                assert "running 1" in " ".join(_text(app, "#scheduler").split())
                assert app.view.kv_blocks_used and app.view.kv_blocks_used >= 1
                assert f"blocks used {app.view.kv_blocks_used} / {app.view.kv_blocks_total}" in _text(app, "#kv-cache")
                await _until(pilot, lambda: max(app.history.generation, default=0) > 0, 30, "a generation rate")
                app.save_screenshot("tui_generation_running.svg", path=str(ARTIFACTS))
            finally:
                stop_background.set()
                await asyncio.to_thread(background.join)
            assert "XLA compiles" in _text(app, "#compiles")

            # The chat pane: type, send, the reply streams in; greedy, so it can be checked below.
            chat = app.query_one(ChatPane)
            await pilot.click("#prompt")
            await pilot.press(*"Name three colors")
            await pilot.press("enter")
            await _until(pilot, lambda: chat.replies_finished == 1, 120, "the chat reply to finish")
            assert chat.last_reply
            shown = [str(w.content) for w in app.query(".assistant")]
            assert shown[-1] == chat.last_reply
            assert chat.messages == [{"role": "user", "content": "Name three colors"},
                                     {"role": "assistant", "content": chat.last_reply}]
            first_reply.append(chat.last_reply)
            app.save_screenshot("tui_dashboard.svg", path=str(ARTIFACTS))

            # A long reply shows in the request table with its tokens so far; Esc stops it and the
            # server aborts the request.
            chat.query_one("#max-tokens").value = "400"
            await pilot.click("#prompt")
            await pilot.press(*"Tell me a long story")
            await pilot.press("enter")
            # The server's own per-request row ("engine", "running") replaces the pane's local one.
            await _until(pilot, lambda: any((r[1], r[2]) in (("chat", "streaming"), ("engine", "running"))
                                            and int(r[4]) >= 2 for r in _table_rows(app)), 60,
                         "the chat reply in the request table")
            app.save_screenshot("tui_chat_streaming.svg", path=str(ARTIFACTS))
            await pilot.press("escape")
            await _until(pilot, lambda: not chat.busy, 10, "the reply to stop")
            await _until(pilot, lambda: (app.view.requests_aborted or 0) >= aborted_before + 2, 20,
                         "the server to count both aborts")
            await _until(pilot, lambda: app.view.running == 0, 20, "the scheduler to empty")

            # Bad settings are refused in the pane, without a request.
            received = app.view.requests_total
            chat.query_one("#temperature").value = "7"
            await pilot.click("#prompt")
            await pilot.press(*"Hello", "enter")
            await pilot.pause(0.5)
            assert "temp '7' is not valid" in str(app.query(".error").last().content)
            assert not chat.busy and app.view.requests_total == received

            # Help, a narrow terminal, quit.
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.resize_terminal(70, 30)
            await pilot.pause(0.3)
            assert app.screen.has_class("-narrow")
            app.save_screenshot("tui_narrow.svg", path=str(ARTIFACTS))
            await pilot.press("ctrl+q")
        assert app.return_code == 0

    asyncio.run(scenario())
    for name in ("tui_generation_running.svg", "tui_chat_streaming.svg", "tui_dashboard.svg", "tui_narrow.svg"):
        assert (ARTIFACTS / name).read_text(encoding="utf-8").lstrip().startswith("<svg")

    # The reply the dashboard showed is the server's greedy answer to the same conversation.
    reference = f32_server.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Name three colors"}],
        temperature=0.0, top_p=1.0, max_tokens=24)
    assert reference.choices[0].message.content == first_reply[0]


def test_dashboard_reports_an_unreachable_server():
    """Attached to a port nobody listens on, the dashboard says so and keeps running."""
    app = DashboardApp("http://127.0.0.1:9", poll_interval=0.2)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await _until(pilot, lambda: app.polls >= 1, 20, "the first poll")
            assert "server unreachable" in _text(app, "#scheduler")
            assert app.is_running

    asyncio.run(scenario())


def test_prometheus_fallback_matches_status(live_server):
    """A server with only /metrics gives the same scheduler and KV numbers as /v1/status."""
    from tui.view import build_view

    status = live_server.status()
    from_status = build_view(status, None)
    from_metrics = build_view(None, parse_prometheus(httpx.get(f"{live_server.url}/metrics", timeout=30).text))
    for field in ("kv_blocks_total", "block_size", "prefix_cache_queries", "requests_total"):
        assert getattr(from_metrics, field) == getattr(from_status, field), field
    assert from_metrics.kv_blocks_total == live_server.llm.block_manager.num_total_blocks
