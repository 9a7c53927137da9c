"""What the cache keeps of one answer, independent of how it was delivered.

An answer that came whole (JSON) and one that came as a stream (SSE) are both
kept as the sequence of content pieces per choice, so either can be served
as the other: a stream replays the same pieces (fresh ids and timestamps), a
whole answer joins them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["chat", "completion", "embedding"]


@dataclass(frozen=True, slots=True)
class CachedChoice:
    index: int
    #: The content pieces in order (one piece for an answer that came whole).
    pieces: tuple[str, ...]
    finish_reason: str | None
    #: Chat only: the role of the message (normally "assistant").
    role: str | None = None


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    kind: Kind
    #: The model name as the client saw it in the answer.
    model: str
    choices: tuple[CachedChoice, ...]
    #: The answer's usage object as the engine reported it (None if it gave none).
    usage: dict[str, Any] | None
    system_fingerprint: str | None = None
    #: Embeddings: the whole answer's JSON, kept as is (never streamed).
    embedding_json: bytes | None = None
