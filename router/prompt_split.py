"""Cutting a rendered prompt at its tokenizer's added tokens.

Hugging Face tokenizers extract added tokens (``<|im_start|>``, ``<s>``...)
before anything else, so ``router/prompts.py`` tokenizes the text between
them piece by piece. The cut is ``re.split`` on an alternation of the tokens,
longest first (a capturing group: odd items are the tokens). That regex scans
every character of a 32k-character prompt against the alternation's first
characters: 11-30 us a request, a third of tokenizing a prompt whose pieces
are all cached (benchmarks/README.md, "Decision latency, fourth pass").

When every added token begins with the same character (``<`` for ChatML,
Llama and most others), ``str.find`` jumps from one occurrence of it to the
next with ``memchr`` and checks the tokens there, longest first: the same
leftmost, longest-first cut as the regex, about 3 us for such a prompt.
Text full of that character (HTML, code) would make that a Python loop per
occurrence, so after ``MAX_FALSE_STARTS`` occurrences that begin no token
the rest of the text goes to the regex (a regex split restarted at a token
boundary cuts the rest as it would have: no match spans a boundary).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Occurrences of the tokens' first character that begin no token before the
#: rest of the text is left to the regex.
MAX_FALSE_STARTS = 16


class AddedTokenSplitter:
    """``split(text)`` == ``re.split("(tok1|tok2|...)", text)``, tokens longest first."""

    __slots__ = ("_lead", "_regex", "_tokens")

    def __init__(self, tokens: Iterable[str]) -> None:
        names = sorted({t for t in tokens if t}, key=len, reverse=True)
        if not names:
            raise ValueError("no added tokens to split at")
        self._tokens = tuple(names)
        self._regex = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        leads = {t[0] for t in names}
        self._lead = leads.pop() if len(leads) == 1 else None

    @property
    def pattern(self) -> str:
        return self._regex.pattern

    def split(self, text: str) -> list[str]:
        lead = self._lead
        if lead is None:
            return self._regex.split(text)
        out: list[str] = []
        tokens = self._tokens
        find = text.find
        start = 0
        false_starts = 0
        pos = find(lead)
        while pos >= 0:
            for token in tokens:
                if text.startswith(token, pos):
                    out.append(text[start:pos])
                    out.append(token)
                    start = pos + len(token)
                    pos = find(lead, start)
                    break
            else:
                false_starts += 1
                if false_starts > MAX_FALSE_STARTS:
                    out.extend(self._regex.split(text[start:]))
                    return out
                pos = find(lead, pos + 1)
        out.append(text[start:])
        return out
