"""A completion's text as it decodes: `IncrementalDetokenizer`, for ragft's transformers engine.

Decoding the whole completion every step would cost O(length) per token, so text is decoded over
a short window of recent tokens, and held back while it ends in an incomplete UTF-8 character or
in what may be the beginning of a stop string.
"""

from __future__ import annotations

from typing import Optional, Sequence


class IncrementalDetokenizer:
    """One completion's text as it grows token by token, cut at the first stop string.

    The concatenation of the pieces `push` and `finish` return equals
    `tokenizer.decode(ids, skip_special_tokens=True)` truncated before the first stop string (and with
    `lstrip`, without the whitespace it starts with).
    Each step decodes only a window that starts a few tokens back (vLLM's scheme): the tokens
    before the window's new part give the decoder its context (SentencePiece drops the leading
    space of a window's first token, byte-level BPE needs the earlier bytes of a character), and
    the new text is what the window decodes to beyond its old part.
    """

    __slots__ = ("_decode", "_ids", "_prefix", "_read", "_prefix_text", "_text", "_sent", "_stops", "_scan",
                 "_lstrip")

    def __init__(self, tokenizer, stops: Sequence[str] = (), lstrip: bool = False):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # ids before this are decoded into _text
        self._prefix_text = ""  # ids[_prefix:_read] decoded on their own
        self._text = ""  # everything decoded so far (up to _read)
        self._sent = 0  # characters of _text already returned
        self._stops = tuple(stops)
        # A stop string that ends in new text starts at most this far before it.
        self._scan = max(map(len, self._stops), default=1) - 1
        self._lstrip = lstrip

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return the text that is now final, and whether a stop string ended the completion."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :], skip_special_tokens=True)
        # A trailing U+FFFD is the start of a character whose remaining bytes are in tokens still to come.
        if len(window) <= len(self._prefix_text) or window.endswith("\ufffd"):
            return "", False
        grown_from = len(self._text)
        self._text += window[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix :], skip_special_tokens=True)
        return self._emit(grown_from, final=False)

    def finish(self) -> tuple[str, bool]:
        """The text still held back, now that the completion ends; and whether it completed a stop string."""
        grown_from = len(self._text)
        if self._read < len(self._ids):
            window = self._decode(self._ids[self._prefix :], skip_special_tokens=True)
            self._text += window[len(self._prefix_text) :]
            self._read = len(self._ids)
        return self._emit(grown_from, final=True)

    def _emit(self, grown_from: int, final: bool) -> tuple[str, bool]:
        end, stopped = len(self._text), False
        if self._stops:
            stop_at = self._find_stop(max(0, grown_from - self._scan))
            if stop_at is not None:
                self._text = self._text[:stop_at]
                end, stopped = stop_at, True
            elif not final:
                end -= self._partial_stop()
        if self._lstrip and (self._sent == 0 or self._text[: self._sent].isspace()):
            self._sent = len(self._text) - len(self._text.lstrip())  # nothing but whitespace sent so far
        if end <= self._sent:
            return "", stopped
        piece, self._sent = self._text[self._sent : end], end
        return piece, stopped

    def _find_stop(self, start: int) -> Optional[int]:
        found = [at for at in (self._text.find(stop, start) for stop in self._stops) if at >= 0]
        return min(found) if found else None

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that begins some stop string: not sendable yet."""
        return max((held_back(self._text, stop) for stop in self._stops), default=0)


def held_back(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`, in time linear in len(stop):
    Knuth-Morris-Pratt run over the last len(stop) - 1 characters (testing each length with `endswith` is
    quadratic, and this runs for every sequence at every decode step)."""
    pattern = stop[:-1]
    if not pattern:
        return 0
    fail = [0] * len(pattern)  # fail[i]: longest proper border of pattern[:i + 1]
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    k = 0
    for char in text[-len(pattern):]:
        while k and (k == len(pattern) or char != pattern[k]):
            k = fail[k - 1]
        if char == pattern[k]:
            k += 1
    return k
