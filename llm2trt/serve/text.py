"""Token ids to the text a client sees, piece by piece: decoded in context (so spaces and multi-byte
characters come out right), held back while it could still be the start of a stop string or of a
character still being spelled, cut at the first stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _held(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished character)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    if text.endswith("\ufffd"):  # the tokenizer's stand-in for bytes of a character not yet complete
        hold = max(hold, 1)
    return hold


class TextStream:
    """The new text of one request as its tokens arrive."""

    def __init__(self, tokenizer: Any | None, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False

    def _text(self) -> str:
        if self.tokenizer is None:  # an artifact without a tokenizer: the ids, as generate prints them
            return " ".join(map(str, self.ids))
        text: str = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text

    def add(self, token: int, last: bool = False) -> str:
        """The text to hand out after `token` (`last`: nothing more comes, hold nothing back); a stop
        string sets `stopped` and cuts the text before it."""
        self.ids.append(token)
        text = self._text()
        window = max((len(s) for s in self.stops), default=0)
        found = [i for i in (text.find(s, max(0, self.sent - window)) for s in self.stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = len(text) if last else len(text) - _held(text, self.stops)
        end = max(end, self.sent)
        piece, self.sent = text[self.sent : end], end
        return piece

    def flush(self) -> str:
        """What was held back, when the request ends without a stop string."""
        if self.stopped:
            return ""
        text = self._text()
        piece, self.sent = text[self.sent :], len(text)
        return piece
