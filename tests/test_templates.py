import re

import pytest
from jinja2.exceptions import UndefinedError

from backends.templates import (
    PRESETS,
    ChatTemplateError,
    ChatTemplateFailed,
    ChatTemplateRejected,
    check_template,
    render,
)

CHAT = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
    {"role": "assistant", "content": None},
    {"role": "user", "content": "  x\n"},
]
USER_FIRST = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tell me a joke."},
]

# tokenizer_config.json "chat_template" of Meta-Llama-3-8B-Instruct.
LLAMA_3_HF = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# tokenizer_config.json "chat_template" of Mistral-7B-Instruct-v0.2 (Llama-2 style).
MISTRAL_HF = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)


def test_exception_tree() -> None:
    assert issubclass(ChatTemplateError, ValueError)
    assert issubclass(ChatTemplateRejected, ChatTemplateError)
    assert issubclass(ChatTemplateFailed, ChatTemplateError)
    assert not issubclass(ChatTemplateRejected, ChatTemplateFailed)


def test_presets_render_as_before() -> None:
    assert render("chatml", CHAT) == (
        "<|im_start|>system\n  Be brief.  <|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n  x\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render("llama-3", CHAT) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert (
        render("mistral", CHAT) == "<s>  Be brief.  \n\n[INST] Hi [/INST]</s>[INST]   x\n [/INST]"
    )
    assert render("plain", CHAT) == (
        "system:   Be brief.  \nuser: Hi\nassistant: \nuser:   x\n\nassistant: "
    )
    for preset in PRESETS:
        check_template(preset)


def test_real_hf_templates_render() -> None:
    assert render(LLAMA_3_HF, CHAT[:2]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render(MISTRAL_HF, USER_FIRST) == (
        "[INST] Hi [/INST]Hello![INST] Tell me a joke. [/INST]"
    )


def test_raise_exception_rejects_the_conversation() -> None:
    with pytest.raises(ChatTemplateRejected) as info:
        render(MISTRAL_HF, [USER_FIRST[0], USER_FIRST[0]])
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    assert info.value.message == message
    assert str(info.value) == message
    with pytest.raises(ChatTemplateRejected, match=r"^Only user and assistant roles"):
        render(MISTRAL_HF, [USER_FIRST[0], {"role": "tool", "content": "42"}])


def test_a_templates_error_carrying_the_clients_words_is_cut() -> None:
    echo = "{% for m in messages %}{{ raise_exception('bad role ' + m.role) }}{% endfor %}"
    with pytest.raises(ChatTemplateRejected) as rejected:
        render(echo, [{"role": "r" * 100_000, "content": "x"}])
    assert len(rejected.value.message) == 2000
    index = "{% for m in messages %}{{ {}[m.role].x }}{% endfor %}"  # names the missing key
    with pytest.raises(ChatTemplateFailed) as failed:
        render(index, [{"role": "r" * 100_000, "content": "x"}])
    assert "rrrr" in str(failed.value) and len(str(failed.value)) == 2000


def test_hugging_face_context() -> None:
    block_tags = "{% for m in messages %}\n  {{ m.role }}\n{% endfor %}"
    assert render(block_tags, USER_FIRST) == "  user\n  assistant\n  user\n"
    tools = [{"type": "function", "function": {"name": "f<é>"}}]
    assert render("{{ tools | tojson }}", [], tools=tools) == (
        '[{"type": "function", "function": {"name": "f<é>"}}]'
    )
    assert render("{{ tools[0] | tojson(indent=1) }}", [], tools=tools[:1]) == (
        '{\n "type": "function",\n "function": {\n  "name": "f<é>"\n }\n}'
    )
    assert render("{{ tools is none }} {{ documents is none }}", []) == "True True"
    assert re.fullmatch(r"\d{4}", render("{{ strftime_now('%Y') }}", []))
    assert (
        render("{% generation %}{{ messages[0].content }}{% endgeneration %}", USER_FIRST) == "Hi"
    )
    with_break = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }} "
    assert render(with_break + "{% endfor %}", USER_FIRST) == "user assistant "
    named = [{"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert render("{{ messages[0].tool_call_id }}", named) == "c1"


def test_template_errors_fail() -> None:
    for source, cause in [
        ("{{ messages[0].content + 1 }}", TypeError),
        ("{{ nothing() }}", UndefinedError),
        ("{{ 1 // 0 }}", ZeroDivisionError),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", RecursionError),
    ]:
        with pytest.raises(ChatTemplateFailed) as info:
            render(source, USER_FIRST)
        assert isinstance(info.value.__cause__, cause), source


def test_invalid_source_fails_at_render_and_is_rejected_by_check() -> None:
    with pytest.raises(ChatTemplateFailed, match="invalid chat template"):
        render("{% for %}", USER_FIRST)
    with pytest.raises(ChatTemplateError) as info:
        check_template("{% for %}")
    assert type(info.value) is ChatTemplateError


def test_range_overflow_fails() -> None:
    with pytest.raises(ChatTemplateFailed) as info:
        render("{% for i in range(10**9) %}{% endfor %}", USER_FIRST)
    assert isinstance(info.value.__cause__, OverflowError)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
        "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}"
        "{{ m(60) }}",
    ],
)
def test_long_renders_are_stopped(source: str) -> None:
    with pytest.raises(ChatTemplateFailed, match=r"ran longer than 0\.01 s"):
        render(source, USER_FIRST, max_seconds=0.01)


def test_the_deadline_counts_the_renders_cpu_time_not_waiting() -> None:
    """A render preempted past its wall deadline (a loaded machine) is not
    cut short; CPU time spent past it is."""
    import time

    from backends.templates import _Budget

    budget = _Budget(0.05, 100)
    time.sleep(0.08)  # waiting: the wall clock passes the deadline, the CPU clock does not
    assert not budget.spent()
    end = time.thread_time() + 0.06
    while time.thread_time() < end:
        pass
    assert budget.spent()


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{{ 'x' * 10**9 }}", "value of length 1000000000"),
        ("{{ [0] * 10**9 }}", "value of length 1000000000"),
        ("{{ 10**9 * 'x' }}", "value of length 1000000000"),
        ("{{ 2 ** (10**9) }}", "integer of 2000000000 bits"),
        (
            "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
            "{% endfor %}",
            "integer of",
        ),
        ("{{ 'x'.ljust(10**7) }}", "value of length 10000000"),
        (
            "{% macro m() %}{% for i in range(10**4) %}{{ 'x' * 200 }}{% endfor %}{% endmacro %}"
            "{% set s = m() %}",
            "value of length 2000000",
        ),
        (
            "{% for i in range(10**5) %}{{ messages[0].content * 100 }}{% endfor %}",
            "output exceeded 1048668 characters",
        ),
    ],
)
def test_blow_ups_fail(source: str, error: str) -> None:
    # A generous time budget: these must fail for their size, even on a busy machine.
    with pytest.raises(ChatTemplateFailed, match=re.escape(error)):
        render(source, USER_FIRST, max_seconds=60)


def test_output_bound() -> None:
    ten = "{% for i in range(10) %}xxxxxxxxxx{% endfor %}"
    assert len(render(ten, [], max_chars=100)) == 100
    with pytest.raises(ChatTemplateFailed, match="output exceeded 99 characters"):
        render(ten, [], max_chars=99)
    with pytest.raises(ChatTemplateFailed):
        render("{{ 'ab' + 'cd' }}", [], max_chars=3)
    long_chat = [{"role": "user", "content": "x" * (2 << 20)}]
    assert len(render("chatml", long_chat)) > 2 << 20


def test_guarded_loops_behave_as_jinja2_loops() -> None:
    source = (
        "{% for m in messages if m.role != 'user' %}{{ loop.index }}/{{ loop.length }}"
        "{{ '!' if loop.last }}{{ loop.cycle('a', 'b') }} {% else %}none{% endfor %}|"
        "{% for x in [] %}{% else %}empty{% endfor %}|"
        "{% for n in [{'v': 1, 'kids': [{'v': 2, 'kids': []}]}] recursive %}"
        "{{ n.v }}({{ loop(n.kids) }}){% endfor %}|"
        "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|"
        "{% for r in messages | map(attribute='role') %}{{ loop.revindex }}{% endfor %}"
    )
    assert render(source, USER_FIRST) == "1/1!a |empty|1(2())|a=1|321"
