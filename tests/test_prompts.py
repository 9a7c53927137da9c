from __future__ import annotations

import asyncio
import json
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from backends.templates import PRESETS, render
from policies.blocks import chain_hashes
from router.config import ConfigError, parse_config
from router.prompt_blocks import ChainCache
from router.prompts import PromptTokenizer, load_prompt_tokenizer

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-llama"
SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tiny() -> PromptTokenizer:
    return load_prompt_tokenizer(str(TINY))


def fresh(**kwargs: Any) -> PromptTokenizer:
    """A tokenizer with empty caches (``load_prompt_tokenizer`` shares one per file).
    Its render deadline is generous: a garbage collection or a preemption in a
    loaded test process once pushed a tiny render past the default 0.1 s, and
    the prompt fell back to characters (the deadline has tests of its own)."""
    kwargs.setdefault("render_seconds", 10.0)
    loaded = load_prompt_tokenizer(str(TINY))
    return PromptTokenizer(loaded.tokenizer, loaded.chat_template, loaded.special_tokens, **kwargs)


def chat(*contents: str) -> dict[str, Any]:
    roles = ["system", "user", "assistant"]
    return {
        "messages": [
            {"role": roles[min(i, 1) if i < 2 else 1 + i % 2], "content": c}
            for i, c in enumerate(contents)
        ]
    }


def test_the_template_comes_from_the_model_directory(tiny: PromptTokenizer) -> None:
    assert tiny.chat_template == (TINY / "chat_template.jinja").read_text()
    assert tiny.separable


def test_chat_is_the_rendered_template_encoded_without_specials(tiny: PromptTokenizer) -> None:
    body = chat("You are terse.", "What is 2 + 2?")
    tokens = tiny.tokens("chat", body)
    assert tokens is not None
    text = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(tiny.chat_template or "", body["messages"]) == text
    expected = tiny.tokenizer.encode(text, add_special_tokens=False).ids
    assert tokens.token_ids() == expected
    assert tokens.num_tokens == len(expected)
    for size in (1, 2, 3, 16):
        assert list(tokens.block_hashes(size)) == chain_hashes(expected, size)


def test_add_generation_prompt_false_is_honoured(tiny: PromptTokenizer) -> None:
    body = {**chat("Hi"), "add_generation_prompt": False}
    tokens = tiny.tokens("chat", body)
    assert tokens is not None
    text = "<|im_start|>system\nHi<|im_end|>\n"
    assert tokens.token_ids() == tiny.tokenizer.encode(text, add_special_tokens=False).ids


def test_text_parts_are_joined_by_newlines_as_vllm_does(tiny: PromptTokenizer) -> None:
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    joined = {"role": "user", "content": "a\nb"}
    left = tiny.tokens("chat", {"messages": [parts]})
    right = tiny.tokens("chat", {"messages": [joined]})
    assert left is not None and right is not None
    assert left.token_ids() == right.token_ids()


def test_prompts_the_router_cannot_reproduce_get_no_tokens(tiny: PromptTokenizer) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:,x"}}
    assert tiny.tokens("chat", {"messages": [{"role": "user", "content": [image]}]}) is None
    assert tiny.tokens("chat", {**chat("a"), "continue_final_message": True}) is None
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    assert tiny.tokens("chat", {**chat("a"), **kwargs}) is None
    assert tiny.tokens("chat", {"messages": "nope"}) is None
    assert tiny.tokens("completion", {"prompt": ["a", "b"]}) is None
    assert tiny.tokens("embedding", {"input": "a"}) is None


def test_text_the_tokenizer_refuses_gives_no_tokens(tiny: PromptTokenizer) -> None:
    lone = "a\ud800b"  # JSON may carry a lone surrogate; tokenizers refuses it
    assert tiny.tokens("chat", {"messages": [{"role": "user", "content": lone}]}) is None
    assert asyncio.run(fresh(thread_chars=0).tokens_async("completion", {"prompt": lone})) is None
    assert tiny.tokens("completion", {"prompt": [1, 1 << 40]}) is None
    assert tiny.tokens("completion", {"prompt": [1, -5]}) is None


def test_a_template_that_raises_gives_no_tokens() -> None:
    loaded = load_prompt_tokenizer(str(TINY))
    strict = PromptTokenizer(loaded.tokenizer, "{{ raise_exception('no') }}")
    assert strict.tokens("chat", chat("a")) is None
    assert strict.failures == {"rejected": 1, "failed": 0, "encode": 0}


def test_failures_are_counted_by_reason() -> None:
    """What the router meant to tokenize and could not (the request routes on
    characters): kvroute_prompt_tokenize_failures_total{reason}. Prompts it
    does not try (images, template arguments) are not failures."""
    loaded = load_prompt_tokenizer(str(TINY))
    broken = PromptTokenizer(loaded.tokenizer, "{{ messages[0]['content'] | int // 0 }}")
    assert broken.tokens("chat", chat("1")) is None
    slow = PromptTokenizer(
        loaded.tokenizer,
        "{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
        render_seconds=0.001,
    )
    assert slow.tokens("chat", chat("a")) is None
    assert broken.failures["failed"] == slow.failures["failed"] == 1
    counted = fresh()
    lone = "a\ud800b"
    assert counted.tokens("chat", {"messages": [{"role": "user", "content": lone}]}) is None
    assert asyncio.run(counted.tokens_async("completion", {"prompt": lone})) is None
    image = {"type": "image_url", "image_url": {"url": "data:,x"}}
    assert counted.tokens("chat", {"messages": [{"role": "user", "content": [image]}]}) is None
    assert counted.failures == {"rejected": 0, "failed": 0, "encode": 2}


def test_completion_token_ids_are_taken_as_sent(tiny: PromptTokenizer) -> None:
    tokens = tiny.tokens("completion", {"prompt": [5, 6, 7, 8]})
    assert tokens is not None
    assert tokens.token_ids() == [5, 6, 7, 8]
    assert list(tokens.block_hashes(2)) == chain_hashes([5, 6, 7, 8], 2)


def with_bos_eos() -> Tokenizer:
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    return tok


def test_completions_add_the_post_processors_specials_chats_do_not() -> None:
    pt = PromptTokenizer(with_bos_eos(), PRESETS["chatml"])
    prompt = "def f(x):\n    return x<|im_end|> tail"
    tokens = pt.tokens("completion", {"prompt": prompt})
    assert tokens is not None
    expected = pt.tokenizer.encode(prompt, add_special_tokens=True).ids
    assert expected[0] == 0 and expected[-1] == 1
    assert tokens.token_ids() == expected
    chat_tokens = pt.tokens("chat", chat("x"))
    assert chat_tokens is not None
    assert chat_tokens.token_ids()[0] == 3  # <|im_start|>, no <s>


def test_the_tiny_tokenizer_adds_nothing_to_completions(tiny: PromptTokenizer) -> None:
    tokens = tiny.tokens("completion", {"prompt": "hello"})
    assert tokens is not None
    assert tokens.token_ids() == tiny.tokenizer.encode("hello", add_special_tokens=False).ids


FRAGMENTS = st.lists(
    st.one_of(
        st.sampled_from(SPECIALS),
        st.text(alphabet=st.sampled_from(list(" \n\tabcxyz_(){}:=<>|/0123é☃")), max_size=12),
    ),
    max_size=12,
)


@given(FRAGMENTS)
@settings(max_examples=300, deadline=None)
def test_pieces_encode_as_the_whole_text(fragments: list[str]) -> None:
    pt = fresh()
    text = "".join(fragments)
    for special in (False, True):
        whole = pt.tokenizer.encode(text, add_special_tokens=special).ids
        plan = pt.plan(text, special)
        tokens = pt.finish(plan, pt.encode_missing(plan))
        assert tokens.token_ids() == whole
        assert list(tokens.block_hashes(3)) == chain_hashes(whole, 3)
        # Again, from the caches.
        again = pt.plan(text, special)
        assert not again.missing
        assert list(pt.finish(again, []).block_hashes(3)) == chain_hashes(whole, 3)


@given(
    st.lists(st.text(max_size=40), min_size=1, max_size=6),
    st.integers(1, 8),
    st.sampled_from([1, 3, 8, 64]),
)
@settings(max_examples=150, deadline=None)
def test_shared_prefixes_hash_as_from_scratch(
    contents: list[str], block_size: int, min_store_tokens: int
) -> None:
    """Growing conversations, their chains resumed from whatever states were
    kept (every piece with a bound of 1 token, few with 64): the same hashes."""
    pt = fresh()
    pt.chains = ChainCache(min_store_tokens=min_store_tokens)
    for n in range(1, len(contents) + 1):
        body = chat(*contents[:n])
        tokens = pt.tokens("chat", body)
        assert tokens is not None
        text = render(pt.chat_template or "", body["messages"])
        expected = pt.tokenizer.encode(text, add_special_tokens=False).ids
        assert tokens.token_ids() == expected
        assert list(tokens.block_hashes(block_size)) == chain_hashes(expected, block_size)


def test_a_shared_system_prompt_is_tokenized_once() -> None:
    pt = fresh()
    system = "You are a careful assistant. " * 200
    first = pt.tokens("chat", chat(system, "first question"))
    assert first is not None
    first.block_hashes(16)
    misses = pt.misses
    plan = pt.plan(render(pt.chat_template or "", chat(system, "second")["messages"]), False)
    assert [text for _, text, _ in plan.missing] == ["user\nsecond"]
    assert pt.misses == misses + 1
    hits_before = pt.chains.hits
    tokens = pt.finish(plan, pt.encode_missing(plan))
    tokens.block_hashes(16)
    assert pt.chains.hits == hits_before + 1


def metaspace_first() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = ["hello world", "two words here", "x y z", "the end"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=SPECIALS))
    return tok


def test_a_tokenizer_whose_pieces_depend_on_position_is_encoded_whole() -> None:
    tok = metaspace_first()
    text = "hello<|im_start|>hello world"
    # Encoded alone, "hello world" would get a leading "▁" it has not in the whole.
    alone = tok.encode("hello world", add_special_tokens=False).ids
    whole = tok.encode(text, add_special_tokens=False).ids
    assert whole[-len(alone) :] != alone
    pt = PromptTokenizer(tok, None)
    assert not pt.separable
    tokens = pt.tokens("completion", {"prompt": text})
    assert tokens is not None
    assert tokens.token_ids() == tok.encode(text, add_special_tokens=True).ids


def test_added_tokens_that_strip_whitespace_disable_pieces() -> None:
    raw = json.loads((TINY / "tokenizer.json").read_text())
    for token in raw["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token["lstrip"] = True
    tok = Tokenizer.from_str(json.dumps(raw))
    pt = PromptTokenizer(tok, PRESETS["chatml"])
    assert not pt.separable
    text = "a  <|im_end|> b"
    tokens = pt.tokens("completion", {"prompt": text})
    assert tokens is not None
    assert tokens.token_ids() == tok.encode(text, add_special_tokens=True).ids


def test_the_piece_cache_is_bounded() -> None:
    pt = fresh(max_cached_tokens=200)
    for i in range(50):
        pt.tokens("completion", {"prompt": f"prompt number {i} " * 5})
        assert pt.cached_tokens <= 200
    assert pt.cached_tokens > 0


def test_the_chain_cache_is_bounded_by_hashes() -> None:
    cache = ChainCache(max_hashes=10, min_store_tokens=1)
    data = [bytes(4 * 8 * i) for i in range(1, 6)]
    for i in range(5):
        cache.hashes([i], [data[i]], 2)
        assert cache.held <= 10
    assert len(cache) >= 1


def _ids(values: range) -> bytes:
    return array("I", values).tobytes()


def test_chain_states_are_kept_only_past_min_store_tokens() -> None:
    """A short tail after a known prefix is hashed again each time, not kept;
    a long piece is kept where it ends; the hashes are the chain's either way."""
    cache = ChainCache(min_store_tokens=64)
    system, question = _ids(range(1000, 1000 + 640)), _ids(range(7, 7 + 20))
    first = cache.hashes([1, 2], [system, question], 16)
    assert list(first) == chain_hashes(list(range(1000, 1640)) + list(range(7, 27)), 16)
    assert len(cache) == 1  # after the system prompt, not after the question
    other = _ids(range(50, 50 + 20))
    hits = cache.hits
    again = cache.hashes([1, 3], [system, other], 16)
    assert cache.hits == hits + 1 and len(cache) == 1
    assert list(again) == chain_hashes(list(range(1000, 1640)) + list(range(50, 70)), 16)
    # Short pieces that add up to min_store_tokens are kept where they do.
    shorts = [_ids(range(i * 16, i * 16 + 16)) for i in range(5)]
    cache.hashes([9, 10, 11, 12, 13], shorts, 16)
    assert len(cache) == 2


def test_long_misses_are_encoded_in_a_thread_with_the_same_result() -> None:
    inline, threaded = fresh(), fresh(thread_chars=0)
    body = chat("s" * 3000, "question")
    a = inline.tokens("chat", body)
    b = asyncio.run(threaded.tokens_async("chat", body))
    assert a is not None and b is not None
    assert a.token_ids() == b.token_ids()


def test_config_loads_the_tokenizer_once_at_validation() -> None:
    config = parse_config(f"models: {{m: {{tokenizer: {TINY}}}}}", {})
    prompts = config.models["m"].prompts
    assert prompts is not None and prompts.separable
    again = parse_config(f"models: {{m: {{tokenizer: {TINY / 'tokenizer.json'}}}}}", {})
    assert again.models["m"].prompts is prompts


def test_config_chat_template_overrides_the_directorys() -> None:
    config = parse_config(f"models: {{m: {{tokenizer: {TINY}, chat_template: plain}}}}", {})
    prompts = config.models["m"].prompts
    assert prompts is not None and prompts.chat_template == "plain"
    tokens = prompts.tokens("chat", chat("hi"))
    assert tokens is not None
    expected = prompts.tokenizer.encode("system: hi\nassistant: ", add_special_tokens=False)
    assert tokens.token_ids() == expected.ids


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("models: {m: {tokenizer: /nonexistent}}", "models.m: no tokenizer.json at"),
        ("models: {m: {chat_template: chatml}}", "chat_template needs a tokenizer"),
        (f"models: {{m: {{tokenizer: {TINY}, chat_template: '{{% if %}}'}}}}", "chat_template"),
    ],
)
def test_config_errors_name_the_model(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml, {})
    assert any(message in e for e in info.value.errors), info.value.errors


def test_cached_chains_are_not_walked_by_the_garbage_collector() -> None:
    import gc

    cache = ChainCache()
    hashes = cache.hashes([1], [_ids(range(64 * 16))], 16)
    gc.collect()
    # Hashes held as machine ints: a collection visits no int of them.
    assert len(hashes) == 64
    assert not any(isinstance(r, int) for r in gc.get_referents(hashes))


def test_metrics_count_each_tokenizers_failures_once() -> None:
    """Two models on one tokenizer (one object, shared) count its failures once."""
    from router.app import build_app
    from tests.helpers import router_config

    template = "{{ raise_exception('no') }}"
    models = {m: {"tokenizer": str(TINY), "chat_template": template} for m in ("a", "b")}
    endpoint = {"id": "e", "url": "http://127.0.0.1:9", "kind": "vllm", "models": ["a", "b"]}
    app = build_app(router_config([endpoint], models=models))
    prompts = app.state.config.models["a"].prompts
    assert prompts is app.state.config.models["b"].prompts
    before = prompts.failures["rejected"]
    assert prompts.tokens("chat", chat("x")) is None
    text = app.state.metrics.render().decode()
    line = f'kvroute_prompt_tokenize_failures_total{{reason="rejected"}} {before + 1}.0'
    assert line in text
    assert 'kvroute_prompt_tokenize_failures_total{reason="encode"}' in text
