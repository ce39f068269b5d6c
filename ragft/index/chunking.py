"""Token-aware chunking with overlap, cut on paragraph and sentence boundaries.

Sizes are counted in the embedding model's own tokens, so `chunk_tokens` is what the encoder
sees (a chunk longer than the model's max_seq_length would be silently truncated by it).
The text is cut into sentence spans (never crossing a blank-line paragraph break); spans are
packed greedily into chunks of at most `chunk_tokens`, and each next chunk starts with the
trailing sentences of the previous one that fit in `chunk_overlap` tokens. A single sentence
longer than a chunk is cut at token boundaries instead.

Every chunk keeps its document id and character offsets into the original text, and its text
is exactly `doc.text[start:end]`, so an answer can cite the passage it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")

# (texts) -> per text, the character (start, end) of each token; special tokens excluded.
TokenOffsets = Callable[[Sequence[str]], list[list[tuple[int, int]]]]


@dataclass(frozen=True)
class Chunk:
    chunk_id: str  # "<doc_id>#<n>", n counting from 0 within the document
    doc_id: str
    text: str
    start: int  # character offsets into the document text: text == doc_text[start:end]
    end: int


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    tokens: int
    paragraph_start: bool  # first sentence of a paragraph: a good place to cut


def hf_token_offsets(tokenizer) -> TokenOffsets:
    """TokenOffsets from a Hugging Face fast tokenizer (the embedding model's)."""

    def offsets(texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        if not texts:
            return []
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                        verbose=False)
        return [[(s, e) for s, e in row if e > s] for row in enc["offset_mapping"]]

    return offsets


class Chunker:
    """Cuts documents into chunks of at most `chunk_tokens` tokens sharing up to `chunk_overlap`."""

    def __init__(self, token_offsets: TokenOffsets, chunk_tokens: int, chunk_overlap: int):
        if chunk_tokens < 1 or not 0 <= chunk_overlap < chunk_tokens:
            raise ValueError(f"need chunk_tokens >= 1 and 0 <= chunk_overlap < chunk_tokens, "
                             f"got {chunk_tokens} and {chunk_overlap}")
        self.token_offsets = token_offsets
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap

    def chunk(self, doc_id: str, text: str) -> list[Chunk]:
        spans = self._spans(text)
        groups = self._pack(spans)
        chunks = []
        for n, (first, last) in enumerate(groups):
            start, end = spans[first].start, spans[last].end
            chunks.append(Chunk(f"{doc_id}#{n}", doc_id, text[start:end], start, end))
        return chunks

    def chunk_many(self, docs: Sequence[tuple[str, str]]) -> list[Chunk]:
        return [c for doc_id, text in docs for c in self.chunk(doc_id, text)]

    # --- sentence spans, each with its token count

    def _spans(self, text: str) -> list[_Span]:
        raw: list[tuple[int, int, bool]] = []  # (start, end, paragraph_start), stripped of outer whitespace
        for p_start, p_end in _split(text, _PARAGRAPH_BREAK, 0, len(text)):
            first = True
            for s_start, s_end in _split(text, _SENTENCE_END, p_start, p_end):
                raw.append((s_start, s_end, first))
                first = False
        offsets = self.token_offsets([text[s:e] for s, e, _ in raw])
        spans: list[_Span] = []
        for (start, end, para), toks in zip(raw, offsets):
            if len(toks) <= self.chunk_tokens:
                spans.append(_Span(start, end, max(len(toks), 1), para))
                continue
            # One sentence longer than a chunk: cut it at token boundaries into pieces the packer treats
            # like sentences. Pieces no longer than the overlap (and the stride) let it overlap them too.
            overlap, stride = self.chunk_overlap, self.chunk_tokens - self.chunk_overlap
            piece = max(min(overlap, stride), 1) if overlap else self.chunk_tokens
            for i in range(0, len(toks), piece):
                window = toks[i:i + piece]
                p_start = start + window[0][0]
                p_end = start + toks[i + piece][0] if i + piece < len(toks) else end
                p_end = _rstrip(text, p_start, p_end)
                spans.append(_Span(p_start, p_end, len(window), para and i == 0))
        return spans

    # --- greedy packing with sentence-snapped overlap

    def _pack(self, spans: list[_Span]) -> list[tuple[int, int]]:
        groups: list[tuple[int, int]] = []
        first = 0
        while first < len(spans):
            last, used = first, spans[first].tokens
            while last + 1 < len(spans):
                nxt = spans[last + 1]
                if used + nxt.tokens > self.chunk_tokens:
                    break
                # Prefer to end a well-filled chunk at a paragraph break rather than split the paragraph.
                if nxt.paragraph_start and used >= self.chunk_tokens // 2 and \
                        used + _paragraph_tokens(spans, last + 1) > self.chunk_tokens:
                    break
                last, used = last + 1, used + nxt.tokens
            groups.append((first, last))
            if last + 1 >= len(spans):
                break
            # The next chunk starts with the longest tail of this one that fits in the overlap,
            # but always moves forward by at least one span.
            nxt_first, tail = last + 1, 0
            while nxt_first - 1 > first and tail + spans[nxt_first - 1].tokens <= self.chunk_overlap:
                nxt_first -= 1
                tail += spans[nxt_first].tokens
            first = nxt_first
        return groups


def _paragraph_tokens(spans: list[_Span], first: int) -> int:
    total = spans[first].tokens
    for span in spans[first + 1:]:
        if span.paragraph_start:
            break
        total += span.tokens
    return total


def _split(text: str, boundary: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """Pieces of text[start:end] between matches of `boundary`, stripped of surrounding whitespace."""
    pieces, cursor = [], start
    for m in boundary.finditer(text, start, end):
        cut = m.start() + len(m.group().rstrip())  # keep the punctuation with its sentence
        pieces.append((cursor, cut))
        cursor = m.end()
    pieces.append((cursor, end))
    out = []
    for s, e in pieces:
        s, e = _lstrip(text, s, e), _rstrip(text, s, e)
        if e > s:
            out.append((s, e))
    return out


def _lstrip(text: str, s: int, e: int) -> int:
    while s < e and text[s].isspace():
        s += 1
    return s


def _rstrip(text: str, s: int, e: int) -> int:
    while e > s and text[e - 1].isspace():
        e -= 1
    return e


def passage(title: str | None, text: str, prepend_title: bool) -> str:
    """What gets embedded and BM25-indexed for a chunk: its text, after its document's title when asked.

    A chunk cut from the middle of a document often never names what it is about ("She carries
    up to 600 passengers."); the title puts the name back without changing the chunk's offsets.
    """
    return f"{title}\n{text}" if prepend_title and title else text
