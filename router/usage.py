"""Token usage read off a response without parsing it.

vLLM (and OpenAI) put ``usage`` at the end of a completion and in the last
chunk of a stream with ``include_usage``. A byte search finds it; nothing on
the hot path parses or re-serialises the body for it.
"""

from __future__ import annotations

import re

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


def scan_usage(data: bytes) -> tuple[int | None, int | None]:
    """``(prompt_tokens, cached_tokens)`` from the last ``"usage"`` in ``data``."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None, None
    prompt = _PROMPT.search(data, at)
    cached = _CACHED.search(data, at)
    return (
        int(prompt.group(1)) if prompt else None,
        int(cached.group(1)) if cached else None,
    )
