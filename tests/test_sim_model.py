"""The vLLM simulator with a real model's tokenizer and chat template, and the
named engine profiles.

tests/fixtures/tiny-llama holds the real tier's tiny tokenizer and its ChatML
template; a non-ChatML model is made here by writing another template (and
special tokens) beside a copy of that tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from backends.sim.engine import EngineParams
from backends.sim.profiles import PROFILES
from backends.sim.server import add_simulate_arguments, params_from_args
from backends.sim.tokenizer import render_chatml
from backends.templates import render
from tests.helpers import FIXTURES, simulator

TINY = FIXTURES / "tiny-llama"
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are the assistant of tenant 7. " * 12},
    {"role": "user", "content": "  What is a prefix cache?  "},
]
BLOCK = 16


def encode(text: str, special: bool = False, tokenizer: Path = TINY / "tokenizer.json") -> int:
    return len(Tokenizer.from_file(str(tokenizer)).encode(text, add_special_tokens=special).ids)


def params(model: Path | str, **kw: Any) -> EngineParams:
    base = EngineParams.zero_latency(block_size=BLOCK, num_blocks=200, max_model_len=2048)
    return EngineParams(**{**base.__dict__, "tokenizer": str(model), **kw})


def llama3_like(tmp_path: Path, bos_in_post_processor: bool = False) -> Path:
    """A copy of the tiny tokenizer with a Llama-3-like template and <s>/</s> as
    bos/eos; optionally a post-processor that prepends <s> (as Llama 3's does)."""
    model = tmp_path / "llama3-like"
    model.mkdir()
    raw = json.loads((TINY / "tokenizer.json").read_text())
    if bos_in_post_processor:
        raw["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}},
        }
    (model / "tokenizer.json").write_text(json.dumps(raw))
    shutil.copy(TINY / "tokenizer_config.json", model / "tokenizer_config.json")
    (model / "chat_template.jinja").write_text(LLAMA3_LIKE)
    return model


async def chat(url: str, messages: list[dict[str, Any]] = MESSAGES) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        r = await c.post(
            url + "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
        usage: dict[str, Any] = r.json()["usage"]
        return usage


async def complete(url: str, prompt: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        r = await c.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        usage: dict[str, Any] = r.json()["usage"]
        return usage


@pytest.mark.parametrize("given", ["dir", "tokenizer.json"])
async def test_chatml_model_counts_tokens_of_its_own_template(given: str) -> None:
    model = TINY if given == "dir" else TINY / "tokenizer.json"
    template = (TINY / "chat_template.jinja").read_text()
    rendered = render(template, MESSAGES)
    assert rendered == render_chatml(MESSAGES)  # the tiny Llama's template is ChatML
    async with simulator(params=params(model)) as (url, sim):
        assert sim.engine.render_chat(MESSAGES) == rendered
        usage = await chat(url)
    assert usage["prompt_tokens"] == encode(rendered)


async def test_non_chatml_template_is_rendered_with_bos_and_counted(tmp_path: Path) -> None:
    model = llama3_like(tmp_path)
    expected = render(LLAMA3_LIKE, MESSAGES, special_tokens={"bos_token": "<s>"})
    assert expected.startswith("<s><|start_header_id|>system<|end_header_id|>\n\n")
    assert "<|im_start|>" not in expected
    async with simulator(params=params(model)) as (url, sim):
        assert sim.engine.render_chat(MESSAGES) == expected
        first = await chat(url)
        again = await chat(url)
    n = encode(expected)
    # The template's <s> is one special token (encoded without adding more), and the
    # count differs from what ChatML would have given: block boundaries move.
    assert first["prompt_tokens"] == n != encode(render_chatml(MESSAGES))
    assert again["prompt_tokens"] == n
    # The repeat hits every full block but the one holding the last prompt token.
    assert again["prompt_tokens_details"]["cached_tokens"] == (n - 1) // BLOCK * BLOCK


async def test_template_from_tokenizer_config_when_no_jinja_file(tmp_path: Path) -> None:
    model = tmp_path / "cfg"
    model.mkdir()
    shutil.copy(TINY / "tokenizer.json", model / "tokenizer.json")
    config = json.loads((TINY / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": LLAMA3_LIKE}]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    async with simulator(params=params(model)) as (url, sim):
        assert sim.engine.render_chat(MESSAGES).startswith("<s><|start_header_id|>")
        usage = await chat(url)
    assert usage["prompt_tokens"] == encode(
        render(LLAMA3_LIKE, MESSAGES, special_tokens={"bos_token": "<s>"})
    )


async def test_completions_add_the_post_processors_special_tokens_chats_do_not(
    tmp_path: Path,
) -> None:
    model = llama3_like(tmp_path, bos_in_post_processor=True)
    tok = model / "tokenizer.json"
    prompt = "def main():\n    return 42\n"
    async with simulator(params=params(model)) as (url, _):
        completion = await complete(url, prompt)
        chatted = await chat(url)
    assert completion["prompt_tokens"] == encode(prompt, tokenizer=tok) + 1
    assert completion["prompt_tokens"] == encode(prompt, special=True, tokenizer=tok)
    rendered = render(LLAMA3_LIKE, MESSAGES, special_tokens={"bos_token": "<s>"})
    # One <s> (the template's), not two.
    assert chatted["prompt_tokens"] == encode(rendered, tokenizer=tok)


async def test_without_a_tokenizer_chatml_and_the_builtin_tokenizer() -> None:
    from backends.sim.tokenizer import tokenize

    async with simulator() as (url, _):
        usage = await chat(url)
        completion = await complete(url, "def main():")
    assert usage["prompt_tokens"] == len(tokenize(render_chatml(MESSAGES)))
    assert completion["prompt_tokens"] == len(tokenize("def main():"))


async def test_a_template_that_rejects_the_chat_is_a_400(tmp_path: Path) -> None:
    model = llama3_like(tmp_path)
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    async with simulator(params=params(model)) as (url, _), httpx.AsyncClient() as c:
        r = await c.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    assert r.status_code == 400 and "user first" in r.json()["error"]["message"]


def test_a_slow_template_is_rendered_as_vllm_would(tmp_path: Path) -> None:
    """vLLM bounds no render: a template past kvroute's own budget (0.1 s of
    CPU, for renders on its event loop) is still rendered by the simulator.
    That budget once failed an ordinary chat with a 400 (replicas.py --sim)."""
    from backends.sim.model import SimModel
    from backends.templates import MAX_SECONDS, ChatTemplateFailed

    model = llama3_like(tmp_path)
    slow = "{% for i in range(5000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
    (model / "chat_template.jinja").write_text(slow + LLAMA3_LIKE)
    with pytest.raises(ChatTemplateFailed, match="longer than"):
        render(slow + LLAMA3_LIKE, MESSAGES, max_seconds=MAX_SECONDS)
    (tmp_path / "fast").mkdir()
    fast = SimModel(llama3_like(tmp_path / "fast")).render_chat(MESSAGES)
    assert SimModel(model).render_chat(MESSAGES) == fast


def test_profile_loads_with_overrides() -> None:
    p = EngineParams.profile("vllm-cpu-tiny", num_blocks=81, tokenizer=str(TINY))
    fields = PROFILES["vllm-cpu-tiny"]
    assert all(getattr(p, k) == v for k, v in fields.items())
    assert p.num_blocks == 81 and p.tokenizer == str(TINY)
    assert p.block_size == 32 and p.step_base > 0 and p.prefill_per_token > 0
    with pytest.raises(ValueError, match="unknown engine profile"):
        EngineParams.profile("no-such-engine")


def test_simulate_cli_profile_and_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    base = ["--port", "1", "--model", "tiny", "--profile", "vllm-cpu-tiny"]
    plain = params_from_args(parser.parse_args(base))
    assert plain == EngineParams.profile("vllm-cpu-tiny")
    given = params_from_args(
        parser.parse_args([*base, "--num-blocks", "81", "--step-base", "0.5", "--tokenizer", "x"])
    )
    assert given == EngineParams.profile(
        "vllm-cpu-tiny", num_blocks=81, step_base=0.5, tokenizer="x"
    )
    zero = params_from_args(parser.parse_args([*base, "--zero-latency"]))
    assert (zero.step_base, zero.prefill_per_token, zero.decode_per_seq) == (0, 0, 0)
    assert zero.block_size == 32


async def test_the_simulator_server_freezes_what_exists_once_started() -> None:
    """A full collection walked the simulator's every object, 33-70 ms of its
    CPU inside a step or a chat render; once started, they are frozen (the
    test fails without)."""
    import asyncio
    import gc

    import uvicorn

    from backends.sim.server import QuietExitServer
    from tests.helpers import eventually

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = QuietExitServer(config)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return bool(server.started)

    try:
        await eventually(started)
        assert gc.get_freeze_count() > 0
    finally:
        server.should_exit = True
        await task
        gc.unfreeze()
