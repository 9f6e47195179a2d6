"""Incremental detokenisation: bytes -> text that is always valid UTF-8, with stop strings held back.

Text is built from each token's exact bytes through an incremental UTF-8 decoder, so a character split
over several tokens is emitted only once complete. Text that could still become the start of a stop
string is held back until it cannot, so a stop string is never streamed partially.
"""

from __future__ import annotations

import codecs

from miras_serve.models import MirasTokenizer


def token_text(tokenizer: MirasTokenizer, token_id: int) -> str:
    """A token's own text for logprobs (special tokens by name; split characters as U+FFFD)."""
    data = tokenizer.token_bytes(token_id)
    if not data and token_id in tokenizer.special_ids:
        return tokenizer.tokenizer.id_to_token(token_id) or ""
    return data.decode("utf-8", errors="replace")


class IncrementalDetokenizer:
    def __init__(self, tokenizer: MirasTokenizer, stop: list[str], include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The decoded text not yet handed out, after the last ``max_stop`` characters that were (a stop
        # string can still begin there); older text is dropped so each token costs O(1), not O(text).
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self.max_stop = max((len(s) for s in stop), default=0)

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.tokenizer.special_ids and not self.skip_special:
            return (self.tokenizer.tokenizer.id_to_token(token_id) or "").encode()
        return self.tokenizer.token_bytes(token_id)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token. Returns the stop string it completed (text is then cut there), else None."""
        before = len(self.text)
        self.text += self.decoder.decode(self._bytes(token_id))
        if not (check_stop and self.stop):
            return None
        start = max(0, before - self.max_stop + 1)
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[: index + len(stop) if self.include_stop else index]
        return stop

    def finish(self, matched_stop: bool) -> None:
        """The sequence ended: release held text and (unless cut at a stop string, after which nothing
        counts) decode incomplete trailing bytes as U+FFFD."""
        if not matched_stop:
            self.text += self.decoder.decode(b"", final=True)
        self.stop = []

    def _held_back(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for length in range(min(self.max_stop - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0

    def take(self) -> str:
        """Text that is now safe to emit (never a possible stop-string prefix)."""
        end = len(self.text) - (self._held_back() if self.stop else 0)
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        keep = max(0, end - self.max_stop)
        self.text, self.emitted = self.text[keep:], end - keep
        return out
