"""Token usage read off a response without parsing it.

vLLM (and OpenAI) put ``usage`` at the end of a completion and in the last
chunk of a stream with ``include_usage``. A byte search finds it; nothing on
the hot path parses or re-serialises the body for it.
"""

from __future__ import annotations

import re

from backends.base import Usage

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


def scan_usage(data: bytes) -> Usage | None:
    """The last ``"usage"`` object in ``data``, or None if there is none."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT.search(data, at)
    completion = _COMPLETION.search(data, at)
    cached = _CACHED.search(data, at)
    return Usage(
        prompt_tokens=int(prompt.group(1)) if prompt else None,
        completion_tokens=int(completion.group(1)) if completion else None,
        cached_tokens=int(cached.group(1)) if cached else None,
    )
