"""Chat templates rendered as strings joined (backends/chat_format.py), where
the template is a plain loop over messages: found by probing, equal to the
Jinja render on any conversation, refused for templates that are not such a
loop, and dropped by the router at the first request it renders otherwise."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.chat_format import ROLES, LoopFormat
from backends.templates import PRESETS, render
from router.prompts import FORMAT_CHECK_EVERY, PromptTokenizer, load_prompt_tokenizer
from tests.real.build_tiny_model import LLAMA3_TEMPLATE

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-llama"
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

#: Every template the repository ships or tests with: (source, special tokens).
TEMPLATES: dict[str, tuple[str, dict[str, str] | None]] = {
    **{name: (name, None) for name in PRESETS},
    "tiny-llama": ((TINY / "chat_template.jinja").read_text(), {"bos_token": "<s>"}),
    "held-out llama3": (LLAMA3_TEMPLATE, LLAMA3_SPECIALS),
}

TEXT = st.lists(
    st.sampled_from([*"ab \n\t☃é{}%<|>", "<|im_start|>", "<s>", "[INST]", "{{ x }}"]),
    max_size=30,
).map("".join)
CONVERSATIONS = st.lists(st.tuples(st.sampled_from(ROLES), TEXT), min_size=1, max_size=7)


@functools.cache
def found(name: str) -> LoopFormat | None:
    source, specials = TEMPLATES[name]
    return LoopFormat.find(source, specials)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_shipped_template_has_a_format(name: str) -> None:
    fmt = found(name)
    assert fmt is not None
    assert set(fmt.around) == set(ROLES)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(list(TEMPLATES)), messages=CONVERSATIONS, generation=st.booleans())
def test_a_format_renders_what_the_template_renders(
    name: str, messages: list[tuple[str, str]], generation: bool
) -> None:
    source, specials = TEMPLATES[name]
    fmt = found(name)
    assert fmt is not None
    expected = render(
        source,
        [{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=generation,
        special_tokens=specials,
    )
    assert fmt.format(messages, generation) == expected


NOT_A_LOOP = {
    # A default system prompt when the chat has none (Qwen 2.5).
    "default system": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # The system prompt folded into the first turn (Llama 2).
    "folded system": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}"
        "{% endif %}{% for m in rest %}{% if loop.first %}[INST] <<SYS>>{{ sys }}<</SYS>> "
        "{{ m['content'] }} [/INST]{% else %}{{ m['role'] }}: {{ m['content'] }}{% endif %}"
        "{% endfor %}"
    ),
    # The last message written apart.
    "last apart": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
    ),
    # Something written after long contents only (the probes' sentinels are short).
    "long contents": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['content'] | length > 20 %} (long){% endif %}{{ '\\n' }}{% endfor %}"
    ),
    # The content's case changed.
    "upper": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}",
    # Roles refused unless they alternate.
    "alternating": (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    ),
}


@pytest.mark.parametrize("name", list(NOT_A_LOOP))
def test_templates_that_are_not_a_plain_loop_get_no_format(name: str) -> None:
    assert LoopFormat.find(NOT_A_LOOP[name]) is None


def tokenizer(template: str | None = None) -> PromptTokenizer:
    loaded = load_prompt_tokenizer(str(TINY))
    return PromptTokenizer(
        loaded.tokenizer,
        template or loaded.chat_template,
        loaded.special_tokens,
        render_seconds=10.0,
    )


def body(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


FORMATTED, RENDERED = tokenizer(), tokenizer()
RENDERED.format = None


@settings(max_examples=60, deadline=None)
@given(messages=CONVERSATIONS, generation=st.booleans())
def test_the_router_tokenizes_a_formatted_chat_as_a_rendered_one(
    messages: list[tuple[str, str]], generation: bool
) -> None:
    formatted, rendered = FORMATTED, RENDERED
    formatted.formatted = rendered.formatted = 0
    request = body(
        *({"role": r, "content": c} for r, c in messages), add_generation_prompt=generation
    )
    a, b = formatted.tokens("chat", request), rendered.tokens("chat", request)
    assert formatted.formatted == 1 and rendered.formatted == 0
    assert a is not None and b is not None
    assert a.token_ids() == b.token_ids()
    assert a.block_hashes(16) == b.block_hashes(16)


def test_messages_with_more_than_role_and_content_are_rendered() -> None:
    """A template may write a message's name (or tool calls): such a message
    goes through Jinja, whose output differs from the format's."""
    named = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "{% if m['name'] %} ({{ m['name'] }}){% endif %}{{ '\\n' }}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    p = tokenizer(named)
    assert p.format is not None
    text = p.prompt("chat", body({"role": "user", "content": "hi", "name": "bob"}))
    assert text == ("<|im_start|>user (bob)\nhi<|im_end|>\n", False)
    assert p.formatted == 0
    listed = body(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert p.prompt("chat", listed) == ("<|im_start|>user\na\nb<|im_end|>\n", False)
    assert p.formatted == 1
    assert p.prompt("chat", body({"role": "user", "content": "x"}, tools=[{"type": "function"}]))
    assert p.formatted == 1


def test_a_template_that_reads_the_content_loses_its_format_at_the_first_check() -> None:
    """No probe contains "SECRET", so the format is found; the router renders
    the first formatted request and one in FORMAT_CHECK_EVERY with Jinja
    (``check_format``, once the request has gone on), and the first check
    that differs drops the format for good."""
    sneaky = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if 'SECRET' in m['content'] %}[redacted]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
    )
    p = tokenizer(sneaky)
    assert p.format is not None
    assert p.prompt("chat", body({"role": "user", "content": "plain"}))  # the first: due a check
    p.check_format()
    assert p.format is not None
    for _ in range(FORMAT_CHECK_EVERY - 1):  # unchecked: the format's text
        text = p.prompt("chat", body({"role": "user", "content": "SECRET"}))
        assert text == ("<|im_start|>user\nSECRET<|im_end|>\n", False)
        p.check_format()  # nothing due
    assert p.format is not None
    # Due a check: routed on the format's text, then checked.
    assert p.prompt("chat", body({"role": "user", "content": "SECRET"})) == text
    p.check_format()
    assert p.format is None and p.format_mismatches == 1
    assert p.prompt("chat", body({"role": "user", "content": "SECRET"})) == (
        "<|im_start|>user\n[redacted]<|im_end|>\n",
        False,
    )


def test_the_router_checks_the_format_after_the_decision(monkeypatch: Any) -> None:
    """``tokens_async`` (the router's path) renders nothing with Jinja before
    it returns: the check runs at the request's next await."""
    sneaky = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if 'SECRET' in m['content'] %}[redacted]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
    )
    p = tokenizer(sneaky)
    renders: list[int] = []
    real = p._render
    monkeypatch.setattr(p, "_render", lambda *a, **kw: renders.append(1) or real(*a, **kw))
    secret = body({"role": "user", "content": "SECRET"})

    async def run() -> tuple[int, int]:
        tokens = await p.tokens_async("chat", secret)
        assert tokens is not None
        before = len(renders)
        await asyncio.sleep(0)
        return before, len(renders)

    assert asyncio.run(run()) == (0, 1)
    assert p.format is None and p.format_mismatches == 1
    # The sync path (tests, benchmarks) checks inline; nothing left due.
    assert p.tokens("chat", secret) is not None and len(renders) == 2


def test_a_conversation_the_template_refuses_keeps_the_format() -> None:
    """A client's conversation the template refuses (here: longer than it
    takes) gets no tokens, and does not cost other requests the format."""
    strict = (
        "{% if messages | length > 8 %}{{ raise_exception('too long') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    p = tokenizer(strict)
    assert p.format is not None
    long = body(*({"role": "user", "content": str(i)} for i in range(9)))
    assert p.prompt("chat", long) is not None  # the first formatted request: due a check
    p.check_format()  # Jinja refuses it
    assert p.format is not None and p.format_mismatches == 0
    # The request had its tokens (through the format): the check's refusal is
    # no failure of a request's prompt (kvroute_prompt_tokenize_failures_total).
    assert p.failures["rejected"] == 0
    assert p.prompt("chat", body({"role": "user", "content": "a"})) == (
        "<|im_start|>user\na<|im_end|>\n",
        False,
    )
