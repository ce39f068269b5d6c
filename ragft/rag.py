"""Retrieval-augmented prompts and their citations: the one copy that serve, eval and RAFT data use.

A RAG prompt is the conversation with its last user message rewritten as `rag.template`
({context}, {question}); the context lists the retrieved chunks with `rag.chunk_template`
({n}, {title}, {doc_id}, {text}). Every chunk placed in the prompt is cited: document id,
chunk id, its character offsets in the document, a quote from its start, and the index
version it was read from (chunk ids are reused when a document changes, the pair is not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ragft.config.schema import RagConfig
from ragft.data.tokenize import chat_prompt_ids
from ragft.index.index import Hit


@dataclass(frozen=True)
class Citation:
    n: int  # the chunk's number in the prompt's context ([n])
    doc_id: str
    chunk_id: str
    start: int  # character offsets of the chunk in the document's text
    end: int
    quote: str  # the first characters of the chunk: document.text[start:start + len(quote)]
    score: float
    index_version: int
    title: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def message_text(content: Any) -> str:
    """The text of an OpenAI message `content`: a string, or a list of parts of which text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user_index(messages: Sequence[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def query_of(messages: Sequence[dict]) -> str | None:
    """What a chat retrieves for: its last user message."""
    i = last_user_index(messages)
    return None if i is None else message_text(messages[i].get("content"))


def render_context(hits: Sequence[Hit], rag: RagConfig) -> str:
    return rag.chunk_separator.join(
        rag.chunk_template.format(n=n, title=hit.title or hit.doc_id, doc_id=hit.doc_id, text=hit.text)
        for n, hit in enumerate(hits, start=1))


def with_context(question: str, hits: Sequence[Hit], rag: RagConfig) -> str:
    """`question` wrapped in the RAG template around `hits` (unchanged when there are none)."""
    if not hits:
        return question
    return rag.template.format(context=render_context(hits, rag), question=question)


def rag_messages(messages: Sequence[dict], hits: Sequence[Hit], rag: RagConfig) -> list[dict]:
    """The conversation with its last user message put into the RAG template."""
    out = [dict(m) for m in messages]
    i = last_user_index(out)
    if i is not None and hits:
        out[i]["content"] = with_context(message_text(out[i].get("content")), hits, rag)
    return out


def prompt_ids(tokenizer, messages: Sequence[dict], hits: Sequence[Hit], rag: RagConfig) -> list[int]:
    """The token ids a chat model generates from: the conversation in the RAG template around `hits`,
    rendered as training renders chat rows. `ragft serve` and `ragft eval` both call this.

    Raises jinja2.TemplateError when the chat template rejects the conversation."""
    return chat_prompt_ids(tokenizer, rag_messages(messages, hits, rag))


def citations(hits: Sequence[Hit], index_version: int, quote_chars: int) -> list[Citation]:
    return [Citation(n=n, doc_id=h.doc_id, chunk_id=h.chunk_id, start=h.start, end=h.end,
                     quote=h.text[:quote_chars], score=round(h.score, 6), index_version=index_version, title=h.title)
            for n, h in enumerate(hits, start=1)]


def check_templates(rag: RagConfig) -> list[str]:
    """Problems of the templates, found by rendering them once (a stray brace or an unknown field)."""
    problems = []
    for key, template, fields in (("template", rag.template, dict(context="c", question="q")),
                                  ("chunk_template", rag.chunk_template, dict(n=1, title="t", doc_id="d", text="x"))):
        try:
            template.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            problems.append(f"serve.rag.{key}={template!r} does not render: {type(err).__name__}: {err} "
                            f"(fields: {', '.join('{' + f + '}' for f in fields)}; write literal braces as {{{{ }}}})")
    if "{question}" not in rag.template:
        problems.append("serve.rag.template must contain {question}")
    return problems
