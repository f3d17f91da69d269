"""The Textual dashboard: scheduler, KV cache, memory, throughput and compiles on the left,
a chat with the served model on the right (stacked on narrow terminals).

Everything comes from the server over HTTP (`/v1/status`, `/metrics`, the chat route),
polled every `poll_interval` seconds; only memory is read locally, and only when the
server runs in this very process (`mistralrs-jax tui` without `--url`).
"""
from __future__ import annotations

import collections
import logging
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static

from .chat import ChatPane
from .client import ChatSettings, ServerClient
from .memory import read_local_memory
from .panels import compile_text, kv_cache_text, memory_text, rate_label, scheduler_text
from .view import DashboardView, RequestRow, ThroughputHistory

REQUEST_COLUMNS = ("request", "source", "status", "prompt", "output", "tok/s", "age s")

HELP_KEYS = (
    ("F1", "this help (Esc or F1 closes it)"),
    ("Ctrl+Q", "quit"),
    ("Tab / Shift+Tab", "next / previous field"),
    ("F2", "type a message"),
    ("F3", "sampling settings (temperature, top_p, max_tokens)"),
    ("Enter", "send the message (in a settings field: back to the message)"),
    ("Esc", "stop the reply being streamed"),
    ("Ctrl+L", "clear the conversation"),
    ("Ctrl+R", "refresh the dashboard now"),
)
HELP_NOTES = (
    "Panels: the scheduler (waiting / running / preempted) and its requests; KV cache blocks and the "
    "prefix-cache hit rate; memory (JAX device memory on GPU, process RSS on CPU, or what a remote server "
    "reports); prompt and generation tokens/s per poll; XLA compiles (after warm-up there should be none).",
    "The request table lists the server's requests when its /v1/status reports them, and always the chat "
    "reply streaming from this dashboard (source \"chat\").",
)


def help_text() -> Text:
    text = Text()
    text.append("mistralrs-jax dashboard\n\n", style="bold")
    width = max(len(key) for key, _ in HELP_KEYS) + 2
    for key, description in HELP_KEYS:
        text.append(f"  {key:<{width}}", style="bold")
        text.append(f"{description}\n")
    for note in HELP_NOTES:
        text.append(f"\n{note}\n")
    return text


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1", "dismiss", "close help")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 90; max-width: 95%; height: auto; max-height: 95%;
                            border: thick $primary; background: $surface; padding: 1 2; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(help_text(), id="help-text")


class LogBuffer(logging.Handler):
    """Log records from any thread, kept for the app to show: nothing may write to the terminal
    Textual draws on (the engine and the HTTP server log from their own threads)."""

    def __init__(self, capacity: int = 200):
        super().__init__(level=logging.WARNING)
        self._records: collections.deque[logging.LogRecord] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's own lock
        self._records.append(record)

    def drain(self) -> list[logging.LogRecord]:
        with self.lock:
            records = list(self._records)
            self._records.clear()
        return records


class DashboardApp(App[None]):
    TITLE = "mistralrs-jax"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    CSS = """
    #main { height: 1fr; }
    Screen.-narrow #main { layout: vertical; }
    #dashboard { width: 3fr; }
    #chat { width: 2fr; }
    Screen.-narrow #dashboard { width: 1fr; height: 3fr; }
    Screen.-narrow #chat { width: 1fr; height: 2fr; }
    .panel { height: auto; border: round $primary; padding: 0 1; }
    #requests { height: auto; max-height: 12; border: round $primary; }
    #throughput { height: auto; border: round $primary; padding: 0 1; }
    #throughput Sparkline { height: 2; margin-bottom: 1; }
    #prompt-sparkline > .sparkline--max-color { color: $warning; }
    #generation-sparkline > .sparkline--max-color { color: $success; }
    """
    BINDINGS = [
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("f1", "help", "help"),
        Binding("escape", "stop_reply", "stop reply"),
        Binding("ctrl+l", "clear_chat", "clear chat"),
        Binding("f2", "focus_prompt", "message"),
        Binding("f3", "focus_settings", "settings"),
        Binding("ctrl+r", "refresh_now", "refresh"),
    ]

    def __init__(self, url: str, api_key: str | None = None, poll_interval: float = 1.0,
                 memory_from_this_process: bool = False, chat_settings: ChatSettings | None = None,
                 log_buffer: LogBuffer | None = None):
        super().__init__()
        self.url = url
        self.client = ServerClient(url, api_key)
        self.poll_interval = poll_interval
        self.memory_from_this_process = memory_from_this_process
        self.chat_settings = chat_settings
        self.log_buffer = log_buffer
        self.history = ThroughputHistory()
        self.view = DashboardView()
        self.polls = 0
        self._polling = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with VerticalScroll(id="dashboard"):
                yield Static(id="scheduler", classes="panel")
                yield DataTable(id="requests", cursor_type="none", zebra_stripes=True)
                yield Static(id="kv-cache", classes="panel")
                yield Static(id="memory", classes="panel")
                with Vertical(id="throughput"):
                    yield Static(id="prompt-rate")
                    yield Sparkline([], id="prompt-sparkline")
                    yield Static(id="generation-rate")
                    yield Sparkline([], id="generation-sparkline")
                yield Static(id="compiles", classes="panel")
            yield ChatPane(self.client, self.chat_settings, id="chat")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.client.base_url
        titles = {"#scheduler": "scheduler", "#requests": "requests", "#kv-cache": "KV cache",
                  "#memory": "memory", "#throughput": "throughput", "#compiles": "compiles",
                  "#chat": "chat"}
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        self.query_one("#requests", DataTable).add_columns(*REQUEST_COLUMNS)
        self.query_one("#prompt", Input).focus()
        self.set_interval(self.poll_interval, self.refresh_dashboard)
        self.call_later(self.refresh_dashboard)
        self.run_worker(self._learn_model(), group="startup")

    async def _learn_model(self) -> None:
        try:
            self.query_one(ChatPane).model = await self.client.model_id()
        except Exception:  # the next poll shows the server as unreachable; chat falls back to "default"
            pass

    async def on_unmount(self) -> None:
        await self.client.close()

    # -- polling ------------------------------------------------------------------

    async def refresh_dashboard(self) -> None:
        if self._polling:  # a slow server: never stack polls up
            return
        self._polling = True
        try:
            view = await self.client.poll()
        finally:
            self._polling = False
        if not self.is_running:
            return
        if self.memory_from_this_process:
            view.memory = read_local_memory()
        self.view = view
        self.history.add(view)
        self.polls += 1
        self._render_view(view)
        self._show_logs()

    def _render_view(self, view: DashboardView) -> None:
        if view.model:
            self.title = f"mistralrs-jax · {view.model}"
        self.query_one("#scheduler", Static).update(scheduler_text(view))
        self.query_one("#kv-cache", Static).update(kv_cache_text(view))
        self.query_one("#memory", Static).update(memory_text(view.memory, view.mesh_devices))
        self.query_one("#compiles", Static).update(compile_text(view))
        prompt, generation = list(self.history.prompt), list(self.history.generation)
        self.query_one("#prompt-rate", Static).update(rate_label("prompt", prompt))
        self.query_one("#generation-rate", Static).update(rate_label("generation", generation))
        # Left-padded to the full history: the newest poll sits at the right edge, one column per poll.
        padding = [0.0] * (self.history.length - len(prompt))
        self.query_one("#prompt-sparkline", Sparkline).data = padding + prompt
        self.query_one("#generation-sparkline", Sparkline).data = padding + generation
        self._render_requests(view)

    def request_rows(self, view: DashboardView | None = None) -> list[RequestRow]:
        """The table's rows: the server's per-request data (if any), then this dashboard's own reply."""
        view = view or self.view
        rows = list(view.engine_requests or [])
        known = {row.request_id.partition("#")[0] for row in rows}
        rows += [row for row in self.query_one(ChatPane).local_rows() if row.request_id not in known]
        return rows

    def _render_requests(self, view: DashboardView) -> None:
        table = self.query_one("#requests", DataTable)
        table.clear()
        for row in self.request_rows(view):
            table.add_row(row.request_id[-24:], row.source, row.status, _cell(row.prompt_tokens),
                          str(row.output_tokens), _cell(row.tokens_per_s, "{:.1f}"), _cell(row.age_s, "{:.1f}"))
        note = "" if view.engine_requests is not None else " (server reports no per-request data: chat only)"
        table.border_subtitle = f"{table.row_count} in flight{note}"

    def _show_logs(self) -> None:
        if self.log_buffer is None:
            return
        for record in self.log_buffer.drain()[-3:]:
            self.notify(Text(record.getMessage()[:300]).plain, title=record.name,
                        severity="error" if record.levelno >= logging.ERROR else "warning")

    # -- actions ------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_stop_reply(self) -> None:
        self.query_one(ChatPane).stop()

    def action_clear_chat(self) -> None:
        self.query_one(ChatPane).clear()

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_focus_settings(self) -> None:
        self.query_one("#temperature", Input).focus()

    async def action_refresh_now(self) -> None:
        await self.refresh_dashboard()


def _cell(value: Any, fmt: str = "{}") -> str:
    return "—" if value is None else fmt.format(value)
