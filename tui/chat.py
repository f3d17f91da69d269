"""The chat pane: a conversation streamed through the server's OpenAI chat route.

Sampling settings sit above the transcript and apply to the next message. A reply in
progress is also listed in the dashboard's request table (source "chat"), with its tokens
so far and tokens/s, measured here from the stream itself.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.validation import Integer, Number
from textual.widgets import Input, Label, Static

from .client import ChatSettings, ServerClient, ServerError
from .view import RequestRow

SETTING_FIELDS = {
    # input id -> (label, parse, validator, ChatSettings attribute)
    "temperature": ("temp", float, Number(minimum=0.0, maximum=2.0), "temperature"),
    "top-p": ("top_p", float, Number(minimum=0.0, maximum=1.0), "top_p"),
    "max-tokens": ("max_tokens", int, Integer(minimum=1, maximum=1_000_000), "max_tokens"),
}


@dataclass
class ActiveReply:
    """The reply being streamed now, as the request table shows it."""

    started: float = field(default_factory=time.monotonic)
    request_id: str | None = None
    chunks: int = 0  # text-bearing chunks: one token each on mistralrs-jax (tokens so far)
    first_text_at: float | None = None
    last_text_at: float | None = None

    def row(self) -> RequestRow:
        rate = None
        if self.first_text_at is not None and self.last_text_at is not None and self.chunks > 1:
            rate = (self.chunks - 1) / max(self.last_text_at - self.first_text_at, 1e-6)
        return RequestRow(self.request_id or "(starting)", "chat", "streaming" if self.chunks else "waiting",
                          None, self.chunks, rate, time.monotonic() - self.started)


class ChatPane(Vertical):
    DEFAULT_CSS = """
    ChatPane #chat-settings { height: auto; }
    ChatPane #chat-settings Label { padding: 1 1 0 1; }
    ChatPane #chat-settings Input { width: 1fr; min-width: 8; }
    ChatPane #transcript { height: 1fr; border: round $secondary; }
    ChatPane .message { margin: 0 0 1 0; }
    ChatPane .user { color: $text-accent; }
    ChatPane .assistant { color: $text; }
    ChatPane .error { color: $text-error; }
    ChatPane .note { color: $text-muted; }
    """

    def __init__(self, client: ServerClient, settings: ChatSettings | None = None, **kwargs):
        super().__init__(**kwargs)
        self.client = client
        self.initial_settings = settings or ChatSettings()
        self.messages: list[dict[str, str]] = []
        self.active: ActiveReply | None = None
        self.last_reply: str | None = None
        self.replies_finished = 0
        self.model = "default"

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-settings"):
            for input_id, (label, _, validator, attribute) in SETTING_FIELDS.items():
                yield Label(label)
                yield Input(str(getattr(self.initial_settings, attribute)), id=input_id, validators=[validator],
                            type="integer" if attribute == "max_tokens" else "number")
        yield VerticalScroll(id="transcript")
        yield Input(placeholder="Message — Enter sends, Esc stops the reply, Ctrl+L clears", id="prompt")

    # -- settings -----------------------------------------------------------------

    def settings(self) -> ChatSettings:
        """The settings as typed now; ValueError names a field that does not parse or is out of range."""
        values = {}
        for input_id, (label, parse, validator, attribute) in SETTING_FIELDS.items():
            raw = self.query_one(f"#{input_id}", Input).value.strip()
            if not validator.validate(raw).is_valid:
                raise ValueError(f"{label} {raw!r} is not valid: {validator.failure_description or 'out of range'}")
            values[attribute] = parse(raw)
        return ChatSettings(**values)

    # -- conversation -------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.active is not None

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "prompt":
            if self.send(event.value):
                event.input.value = ""
        else:
            self.query_one("#prompt", Input).focus()

    def send(self, text: str) -> bool:
        """Start a reply to `text`; False when nothing was sent (empty, busy, or bad settings)."""
        if not text.strip():
            return False
        if self.busy:
            self.app.notify("a reply is still streaming: wait, or press Esc to stop it", severity="warning")
            return False
        try:
            settings = self.settings()
        except ValueError as exc:
            self._add("error", str(exc))
            return False
        self.messages.append({"role": "user", "content": text})
        self._add("user", f"you: {text}")
        reply = self._add("assistant", "…")
        self.active = ActiveReply()
        self.run_worker(self._stream_reply(reply, settings), group="chat", exclusive=True)
        return True

    def stop(self) -> None:
        """Stop the reply in progress (closing the stream makes the server abort the request)."""
        if self.busy:
            self.workers.cancel_group(self, "chat")

    def clear(self) -> None:
        self.stop()
        self.messages.clear()
        self.query_one("#transcript", VerticalScroll).remove_children()
        self._add("note", "(conversation cleared)")

    def local_rows(self) -> list[RequestRow]:
        return [self.active.row()] if self.active is not None else []

    async def _stream_reply(self, widget: Static, settings: ChatSettings) -> None:
        assert self.active is not None
        active, text, note = self.active, "", ""
        try:
            async for event in self.client.stream_chat(list(self.messages), settings, model=self.model):
                active.request_id = active.request_id or event.request_id
                if event.text:
                    now = time.monotonic()
                    active.chunks += 1
                    active.first_text_at = active.first_text_at or now
                    active.last_text_at = now
                    text += event.text
                    widget.update(Text(text))
                    self._scroll()
                if event.finish_reason == "length":
                    note = f"(stopped at max_tokens {settings.max_tokens})"
        except asyncio.CancelledError:
            note = "(stopped)"
            # Keep the history alternating user/assistant: the partial reply stands as the answer.
            if text:
                self.messages.append({"role": "assistant", "content": text})
            else:
                self.messages.pop()
            raise
        except (ServerError, OSError, ValueError) as exc:
            self.messages.pop()  # the question stays on screen but leaves the history: it got no answer
            widget.remove()
            self._add("error", f"error: {exc}")
            return
        except Exception as exc:  # e.g. httpx errors: show them in the pane, never crash the dashboard
            self.messages.pop()
            widget.remove()
            self._add("error", f"error: {type(exc).__name__}: {exc}")
            return
        finally:
            self.active = None
            if note:
                self._add("note", note)
        widget.update(Text(text) if text else Text("(empty reply)", style="dim"))
        self.messages.append({"role": "assistant", "content": text})
        self.last_reply = text
        self.replies_finished += 1

    def _add(self, kind: str, content: str) -> Static:
        widget = Static(Text(content), classes=f"message {kind}")
        self.query_one("#transcript", VerticalScroll).mount(widget)
        self._scroll()
        return widget

    def _scroll(self) -> None:
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
