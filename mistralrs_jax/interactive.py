"""`mistralrs-server -i`: a terminal chat that streams the model's replies as they come."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Any, TextIO

from .errors import MistralRsError, PromptTooLongError

log = logging.getLogger(__name__)


INTERACTIVE_HELP = """\
Chat with the model; each line you enter is one message.
Commands:
  \\help               show this message
  \\exit               quit (Ctrl-D does too)
  \\clear              forget the conversation
  \\system TEXT        set the system message
  \\temperature X      sampling temperature, 0 (greedy) to 2
  \\topk N             top-k sampling (0 disables)
  \\topp X             top-p sampling, in (0, 1]
Ctrl-C while the model writes stops that reply."""


def interactive_sampling_params(seed: int | None = None) -> Any:
    """mistral.rs's interactive defaults: nearly greedy, with mild repetition penalties."""
    from .sampling_params import SamplingParams

    return SamplingParams(temperature=0.1, top_k=32, top_p=0.1, min_p=0.05, frequency_penalty=0.1,
                          presence_penalty=0.1, max_tokens=None, seed=seed)


class InteractiveChat:
    """A terminal conversation: history, streaming replies, and backslash commands."""

    def __init__(self, llm: Any, args: argparse.Namespace):
        self.llm = llm
        self.truncate = bool(getattr(args, "truncate_sequence", False))
        self.request_log = getattr(args, "request_log_file", None)
        self.params = interactive_sampling_params(getattr(args, "seed", None))
        self.messages: list[dict[str, str]] = []

    def run(self, stdin: TextIO, stdout: TextIO) -> int:
        tty = stdin.isatty() and stdout.isatty()
        if tty:
            import readline  # noqa: F401  (line editing and history for input())

            print(f"{self.llm.model_name}\n{INTERACTIVE_HELP}", file=stdout)
        while True:
            try:
                line = input("> ") if tty else stdin.readline()
            except EOFError:
                break
            except KeyboardInterrupt:  # at the prompt, Ctrl-C quits (mistral.rs does the same)
                break
            if not tty and line == "":
                break
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if text.startswith("\\"):
                if not self.command(text, stdout):
                    break
                continue
            self.reply(text, stdout)
        if tty:
            print(file=stdout)
        return 0

    def command(self, text: str, out: TextIO) -> bool:
        """Run one backslash command; False means quit."""
        name, _, value = text.strip().partition(" ")
        value = value.strip()
        try:
            if name == "\\exit":
                return False
            if name == "\\help":
                print(INTERACTIVE_HELP, file=out)
            elif name == "\\clear":
                self.messages.clear()
                print("(conversation cleared)", file=out)
            elif name == "\\system":
                self.messages = [m for m in self.messages if m["role"] != "system"]
                if value:
                    self.messages.insert(0, {"role": "system", "content": value})
                print("(system message set)" if value else "(system message removed)", file=out)
            elif name == "\\temperature":
                self.set_param("temperature", float(value), 0.0, 2.0, out)
            elif name == "\\topk":
                self.set_param("top_k", int(value), 0, None, out)
            elif name == "\\topp":
                self.set_param("top_p", float(value), 1e-9, 1.0, out)
            else:
                print(f"unknown command {name}; \\help lists the commands", file=out)
        except ValueError:
            print(f"{name} needs a number, e.g. {name} 0.7", file=out)
        out.flush()
        return True

    def set_param(self, field: str, value: float, low: float, high: float | None, out: TextIO) -> None:
        if value < low or (high is not None and value > high):
            raise ValueError(value)
        self.params = dataclasses.replace(self.params, **{field: value})
        print(f"({field} = {value})", file=out)

    def reply(self, text: str, out: TextIO) -> None:
        self.messages.append({"role": "user", "content": text})
        started = time.monotonic()
        pieces: list[str] = []
        stream = None
        while True:
            try:
                stream = self.llm.stream_chat(list(self.messages), self.params)
                for delta in stream:
                    pieces.append(delta)
                    out.write(delta)
                    out.flush()
                break
            except KeyboardInterrupt:
                if stream is not None:
                    stream.close()  # closing the stream aborts its request in the engine
                out.write(" [stopped]")
                break
            except PromptTooLongError as exc:
                if not pieces and self.truncate and self._drop_oldest_turn():
                    continue
                self.messages.pop()
                print(f"error: {exc} (\\clear starts a fresh conversation)", file=sys.stderr)
                return
            except MistralRsError as exc:
                self.messages.pop()
                print(f"error: {exc}", file=sys.stderr)
                return
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        self._log_exchange(answer, time.monotonic() - started)

    def _drop_oldest_turn(self) -> bool:
        """Forget the oldest exchange (the system message stays); False when nothing is left to drop."""
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        if len(self.messages) - first <= 1:
            return False
        del self.messages[first]
        while len(self.messages) - first > 1 and self.messages[first]["role"] != "user":
            del self.messages[first]
        return True

    def _log_exchange(self, answer: str, seconds: float) -> None:
        if not self.request_log:
            return
        record = {"time": time.time(), "messages": self.messages[:-1], "response": answer,
                  "seconds": round(seconds, 3), "params": dataclasses.asdict(self.params)}
        with open(self.request_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

