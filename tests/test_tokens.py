"""Token counts kvroute makes itself: a model's tokenizer, or an estimate."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from backends import Usage
from backends.sim.tokenizer import tokenize, tokenizer_json
from backends.tokens import TokenCounter, TokenizerError, estimate, load_tokenizer
from router.config import ConfigError, parse_config
from router.registry import EndpointState

CORPUS = [
    "The router sends each request to the server whose cache holds its prefix.",
    "Tokens are counted by the engine where it can, else by the model's tokenizer.",
] * 20


@functools.cache
def bpe() -> Tokenizer:
    """A small BPE that strips whitespace and adds a BOS, like many real models."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Strip()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "<unk>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def test_estimate_is_a_quarter_of_the_characters_rounded_up() -> None:
    assert [estimate(t) for t in ("", "a", "abcd", "abcde", "x" * 4000)] == [0, 1, 1, 2, 1000]


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_a_text_that_is_not_empty_is_never_0_tokens(text: str) -> None:
    for counter in (TokenCounter(), TokenCounter(bpe()), TokenCounter(bpe(), True)):
        assert counter.count(text) >= 1
        assert counter.count(text, special_tokens=True) >= 1
        usage = counter.usage(text, text, None, None)
        assert usage.prompt_tokens and usage.completion_tokens and usage.estimated
        # An engine's 0 for a text that is not empty is not believed either.
        assert counter.usage(text, text, 0, 0).completion_tokens


def test_the_engine_count_wins_and_only_kvroute_counts_are_estimated() -> None:
    counter = TokenCounter()
    assert counter.usage("abcdefgh", "abcd", 7, 3) == Usage(7, 3, None, False)
    assert counter.usage("abcdefgh", "abcd", 7, None) == Usage(7, 1, None, True)
    assert counter.usage("abcdefgh", "", None, 0) == Usage(2, 0, None, True)
    assert counter.usage("", "", None, None) == Usage(0, 0, None, True)


def test_a_tokenizer_counts_with_or_without_the_special_tokens_the_engine_adds() -> None:
    text = "The router sends each request"
    plain = len(bpe().encode(text, add_special_tokens=False))
    assert TokenCounter(bpe()).count(text) == plain
    assert TokenCounter(bpe()).usage(text, text, None, None).prompt_tokens == plain
    # TGI adds the BOS to the prompt; completions never get one.
    assert TokenCounter(bpe(), True).usage(text, text, None, None) == Usage(
        plain + 1, plain, None, True
    )
    # Whitespace this tokenizer drops was still generated.
    assert TokenCounter(bpe()).count("   ") == 1


def test_the_simulators_tokenizer_as_tokenizer_json_counts_as_the_simulators(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sim.json"
    path.write_text(tokenizer_json())
    counter = TokenCounter(load_tokenizer(str(path)))
    for text in ("Hello world, this is   a tést!\n\n ok 123 abcdefghijk", " ", "日本語 x\t"):
        assert counter.count(text) == len(tokenize(text))


def test_tokenizers_load_once_per_version_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    path.write_text(tokenizer_json())
    first = load_tokenizer(str(path))
    assert load_tokenizer(str(path)) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_tokenizer(str(path)) is not first
    with pytest.raises(TokenizerError, match=r"cannot read tokenizer '.*nope\.json'"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match=r"cannot parse tokenizer '.*bad\.json'"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_config_checks_the_tokenizer_and_the_target_carries_it(tmp_path: Path) -> None:
    def config(path: Path) -> str:
        return (
            "endpoints: [{id: t, url: 'http://t:1', kind: triton, "
            f"models: [x, {{name: m, tokenizer: '{path}'}}]}}]"
        )

    with pytest.raises(ConfigError) as info:
        parse_config(config(tmp_path / "missing.json"), {})
    assert info.value.errors == [
        f"endpoints[0].models[1].tokenizer: cannot read tokenizer '{tmp_path / 'missing.json'}':"
        " No such file or directory"
    ]
    good = tmp_path / "tok.json"
    good.write_text(tokenizer_json())
    cfg = parse_config(config(good), {})
    endpoint = EndpointState.from_config(cfg.endpoints[0], cfg.circuit)
    assert endpoint.targets["m"].tokenizer is load_tokenizer(str(good))
    assert endpoint.targets["x"].tokenizer is None
