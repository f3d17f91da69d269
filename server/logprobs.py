"""Engine logprobs in OpenAI's two formats: chat (`content: [{token, logprob, bytes, top_logprobs}]`)
and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

The engine gives, per generated token, a dict holding the sampled token and the top-k
alternatives (k + 1 entries when the sampled token is not among the top k).
"""
from __future__ import annotations

from typing import Any, Sequence

from mistralrs_jax.outputs import Logprob


def _entry(logprob: Logprob) -> dict[str, Any]:
    return {"token": logprob.decoded, "logprob": logprob.logprob, "bytes": list(logprob.decoded.encode("utf-8"))}


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], top_k: int) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id)
        item = _entry(sampled) if sampled else {"token": "", "logprob": None, "bytes": []}
        best = sorted(entry.values(), key=lambda lp: lp.logprob, reverse=True)[:top_k]
        item["top_logprobs"] = [_entry(lp) for lp in best]
        content.append(item)
    return {"content": content}


class LegacyLogprobs:
    """Builds the legacy block for one choice, chunk by chunk (text offsets run on across chunks)."""

    def __init__(self, start_offset: int = 0):
        self.offset = start_offset

    def block(self, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            sampled = entry.get(token_id) or Logprob(token_id, None, "")  # type: ignore[arg-type]
            tokens.append(sampled.decoded)
            token_logprobs.append(sampled.logprob)
            top_logprobs.append({lp.decoded: lp.logprob for lp in
                                 sorted(entry.values(), key=lambda lp: lp.logprob, reverse=True)})
            offsets.append(self.offset)
            self.offset += len(sampled.decoded)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}
