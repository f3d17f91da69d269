"""Streaming detokenization: generated ids in, text that is safe to send out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

class IncrementalDetokenizer:
    """Text for a growing list of ids, released only when it is final.

    Each push decodes a short window of recent ids twice, with and without the new ones, and releases the
    difference. Decoding a window (not single tokens) keeps the tokenizer's own rules -- byte-level
    merging, SentencePiece's "▁" spaces and byte fallback -- so the released pieces join up to exactly
    `decode(all_ids)`. Text is held back while it may still change:
      * it ends in U+FFFD: an incomplete UTF-8 sequence waiting for more bytes;
      * the last id is a byte-fallback token (`<0xNN>`): the decoder turns a whole run of those into
        text, or into one U+FFFD per byte if the run is not valid UTF-8, only once the run ends.
    A window never starts inside such a run or on an id that decodes to nothing (a skipped special
    token), because a decoder's start-of-text rules (SentencePiece strips one leading space) must only
    touch text that was already released.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self._byte_ids = tokenizer.byte_token_ids
        # With a prompt, the window starts inside it so the first generated token decodes in context
        # (its leading space is kept), but nothing of the prompt itself is released.
        self.read_offset = len(self.ids)
        self.prefix_offset = self._prompt_window_start()

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special_tokens)

    def _inside_byte_run(self, index: int) -> bool:
        return index > 0 and self.ids[index] in self._byte_ids and self.ids[index - 1] in self._byte_ids

    def _prompt_window_start(self) -> int:
        for start in range(self.read_offset - 1, max(self.read_offset - 16, 0) - 1, -1):
            if not self._inside_byte_run(start):
                text = self._decode(start, self.read_offset)
                if text and not text.startswith("\ufffd"):
                    return start
        return 0 if self.read_offset <= 16 else self.read_offset - 16

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final (possibly empty)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if token_id in self._byte_ids:
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        new_text = full_text[len(prefix_text) :]
        if self._decode(self.read_offset):
            self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text

    def flush(self) -> str:
        """Whatever is still held back (an unfinished UTF-8 sequence decodes to U+FFFD here)."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
