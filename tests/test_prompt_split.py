"""The added-token splitter cuts as ``re.split`` on the tokens' alternation does."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.prompt_split import MAX_FALSE_STARTS, AddedTokenSplitter

CHATML = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "<|im"]
MIXED = ["[INST]", "[/INST]", "<s>", "</s>"]


def regex_split(tokens: list[str], text: str) -> list[str]:
    names = sorted(set(tokens), key=len, reverse=True)
    return re.split("(" + "|".join(map(re.escape, names)) + ")", text)


def texts(tokens: list[str]) -> st.SearchStrategy[str]:
    """Text made of the tokens, their fragments and the first character in
    bulk (false starts past the fallback threshold)."""
    fragments = [t[: i + 1] for t in tokens for i in range(len(t))]
    atoms = st.sampled_from([*tokens, *fragments, "<", "<<", "[", " ", "a", "ü", "\n", "x" * 40])
    return st.lists(atoms, max_size=80).map("".join)


@pytest.mark.parametrize("tokens", [CHATML, MIXED, ["<|eot_id|>"]])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_cut_is_the_regex_cut(tokens: list[str], data: st.DataObject) -> None:
    text = data.draw(texts(tokens))
    assert AddedTokenSplitter(tokens).split(text) == regex_split(tokens, text)


def test_text_full_of_the_first_character_falls_back_to_the_regex_past_the_threshold() -> None:
    # False starts first, then tokens: the regex cuts the rest exactly.
    text = "a < b " * (MAX_FALSE_STARTS + 5) + "<|im_start|>user\nhi<|im_end|>\n<s>"
    assert AddedTokenSplitter(CHATML).split(text) == regex_split(CHATML, text)


def test_the_longest_token_wins_where_several_begin() -> None:
    splitter = AddedTokenSplitter(CHATML)
    assert splitter.split("x<|im_start|>y<|imz") == ["x", "<|im_start|>", "y", "<|im", "z"]


def test_no_tokens_is_a_construction_error() -> None:
    with pytest.raises(ValueError):
        AddedTokenSplitter(["", ""])
