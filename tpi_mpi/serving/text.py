"""Generated token ids to text as they come: incremental decoding and stop strings.

A byte-level tokenizer may need several tokens for one character, and a stop string may arrive split over
tokens; so text is released only once it is final: no half character, nothing that could still turn out
to be the start of a stop string.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Decodes a growing list of token ids, each call returning only the new text.

    Decoding the whole list every token costs O(n) a token; this decodes from a few tokens back (the ids
    from `prefix` on), which gives the same text for the byte-level and sentencepiece tokenizers used here.
    """

    def __init__(self, tok: Any):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # decoding starts here
        self.read = 0  # text of ids[prefix:read] was already returned

    def add(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""  # the last token ends in the middle of a character (or adds nothing yet)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """At the end: what is left, an unfinished character included (decoded as U+FFFD, as in tpi_mpi.run)."""
        done = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class StopStrings:
    """Holds back text that may be the start of a stop string; finds the first stop string in the text."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything generated so far
        self.released = 0  # text[:released] was handed out

    def add(self, delta: str) -> tuple[str, bool]:
        """(text that is final now, True if a stop string was found: the text ends before it)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, max(0, self.released - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.released = self.text[self.released:end], end
            self.text = self.text[:end]
            return out, True
        hold = 0  # the longest end of the text that is the beginning of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        end = max(self.released, len(self.text) - hold)
        out, self.released = self.text[self.released:end], end
        return out, False

    def flush(self) -> str:
        """At the end without a stop string: what was held back is final after all."""
        out, self.released = self.text[self.released:], len(self.text)
        return out
