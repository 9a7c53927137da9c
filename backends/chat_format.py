"""A chat template that is a plain loop over messages, rendered without Jinja.

Most chat templates (ChatML, Llama 3, Mistral's, the presets) write every
message as a fixed text before its content, the content (perhaps trimmed),
and a fixed text after it, chosen by the role alone; then, for
``add_generation_prompt``, a fixed text. Rendering such a template with
Jinja's sandbox costs 19-21 us a request on the router's path (a context,
the guarded loop, the budget's clock: a 32k-character system prompt and a
question); joining the same strings costs 5 us, most of it the copy
(benchmarks/README.md, "Decision latency, fifth pass").

``LoopFormat.find`` asks the template itself what those texts are: it
renders probe conversations whose contents are sentinels, reads the texts
around them, and then checks the result against the template on conversations
of every shape it will be used for (roles in several orders and counts,
contents empty, padded with whitespace, multi-line, non-ASCII, looking like
Jinja or like special tokens; with and without the generation prompt). A
template that does anything else with a message (merges system prompts,
reads ``loop.last`` or the content, raises on an order it dislikes) fails a
check and gets no format: the caller keeps rendering it with Jinja.

A probe cannot show that a template never looks inside a content, so the
caller also renders an occasional request with Jinja and compares
(``router/prompts.py``): the format is dropped at the first difference.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from backends.templates import ChatTemplateError, render

#: Probe contents: letters only, so no template filter changes them.
_SENTINELS = ("kvrouteprobeqxone", "kvrouteprobeqxtwo")
#: Roles a format can serve (the OpenAI chat roles a template writes as text).
ROLES = ("system", "user", "assistant")
#: Contents the format is checked on, each in every role.
_CONTENTS = (
    "Hello there.",
    "",
    "  padded on both sides  ",
    "\nline\n\nbreaks\n",
    "tab\tand ünïcödé ☃",
    "{{ not jinja }} {% neither %}",
    "<|im_start|>user\n<s>[INST]</s>",
    " ",
)
#: Role orders the format is checked on: those a chat request has
#: (a system prompt first or not, turns alternating or repeated).
_SHAPES: tuple[tuple[str, ...], ...] = (
    ("user",),
    ("system", "user"),
    ("user", "assistant", "user"),
    ("system", "user", "assistant", "user"),
    ("system", "user", "assistant", "user", "assistant", "user"),
    ("user", "assistant"),
    ("system", "user", "assistant"),
    ("user", "user"),
    ("assistant", "user"),
    ("system",),
    ("assistant",),
    ("system", "system", "user"),
)
#: Of those, the ones every usable template renders (others may raise: a
#: template refusing an order refuses it with or without the format).
_REQUIRED = {("user",), ("system", "user"), ("user", "assistant", "user")}

Render = Callable[[Sequence[Mapping[str, str]], bool], str]


@dataclass(frozen=True, slots=True)
class LoopFormat:
    """Render a chat as ``head``, then each message as ``around[role]``'s two
    texts with its content between (stripped of surrounding whitespace when
    ``strip``), then ``generation`` when asked for."""

    head: str
    around: Mapping[str, tuple[str, str]]
    strip: bool
    generation: str

    def format(
        self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool
    ) -> str | None:
        """``messages`` as (role, content); None for a role it has no texts for."""
        around = self.around
        parts = [self.head]
        for role, content in messages:
            pair = around.get(role)
            if pair is None:
                return None
            parts.append(pair[0])
            parts.append(content.strip() if self.strip else content)
            parts.append(pair[1])
        if add_generation_prompt:
            parts.append(self.generation)
        return "".join(parts)

    @staticmethod
    def find(template: str, special_tokens: Mapping[str, str] | None = None) -> LoopFormat | None:
        """The template's format, if it is a plain loop over messages (checked
        against the template on every probe shape); else None."""

        def jinja(messages: Sequence[Mapping[str, str]], generation: bool) -> str:
            return render(
                template,
                messages,
                add_generation_prompt=generation,
                special_tokens=special_tokens,
            )

        try:
            found = _derive(jinja)
        except ChatTemplateError:
            return None
        if found is None:
            return None
        head, around, generation = found
        for strip in (False, True):
            candidate = LoopFormat(head, around, strip, generation)
            if _agrees(candidate, jinja):
                return candidate
        return None


def _derive(jinja: Render) -> tuple[str, dict[str, tuple[str, str]], str] | None:
    one, two = _SENTINELS
    head: str | None = None
    around: dict[str, tuple[str, str]] = {}
    for role in ROLES:
        try:
            out = jinja([{"role": role, "content": one}, {"role": role, "content": two}], False)
        except ChatTemplateError:
            continue  # a template that refuses this role twice: checked below
        i, j = out.find(one), out.find(two)
        if i < 0 or j < i or out.count(one) != 1 or out.count(two) != 1:
            return None
        after = out[j + len(two) :]
        between = out[i + len(one) : j]
        if not between.startswith(after):
            return None
        before = between[len(after) :]
        if not out[:i].endswith(before):
            return None
        start = out[: i - len(before)] if before else out[:i]
        if head is None:
            head = start
        elif head != start:
            return None
        around[role] = (before, after)
    if head is None or "user" not in around:
        return None
    plain = jinja([{"role": "user", "content": one}], False)
    prompted = jinja([{"role": "user", "content": one}], True)
    if not prompted.startswith(plain):
        return None
    return head, around, prompted[len(plain) :]


def _agrees(fmt: LoopFormat, jinja: Render) -> bool:
    """The format renders every probe conversation as the template does."""
    contents = itertools.cycle(_CONTENTS)
    for shape in _SHAPES:
        if any(role not in fmt.around for role in shape):
            if shape in _REQUIRED:
                return False
            continue
        for _ in range(len(_CONTENTS)):
            messages = [(role, next(contents)) for role in shape]
            for generation in (True, False):
                try:
                    expected = jinja([{"role": r, "content": c} for r, c in messages], generation)
                except ChatTemplateError:
                    if shape in _REQUIRED:
                        return False
                    break
                if fmt.format(messages, generation) != expected:
                    return False
    return True
