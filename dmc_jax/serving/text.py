"""Incremental text of a generated sequence: deltas safe to stream, and stop strings that end it."""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Turns a growing list of token ids into text deltas. Text that may still change is held back: a trailing
    replacement character (an unfinished multi-byte character) and a tail that could begin a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0          # characters of text already returned
        self.text = ""         # the final text (cut at a stop string) once finished
        self.stopped = False   # a stop string ended it

    def add(self, token: int) -> tuple[str, bool]:
        """Appends a token; returns (new text to send, True if a stop string ended the sequence)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self._delta(self.text), True
        ready = len(text) - self.hold
        while ready > self.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        return self._delta(text[:max(ready, self.sent)]), False

    def finish(self) -> str:
        """The rest of the text once the sequence ended ('' after a stop string)."""
        if self.stopped:
            return ""
        self.text = self.tokenizer.decode(self.ids)
        return self._delta(self.text)

    def _delta(self, text: str) -> str:
        out = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return out
