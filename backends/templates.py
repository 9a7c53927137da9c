"""Chat templates: OpenAI messages -> one prompt string, for backends that take
text (TGI's native API, Triton/TensorRT-LLM).

A template is a named preset or a Jinja2 template string in the Hugging Face
``chat_template`` dialect (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``), rendered in a sandbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

PRESETS: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
        "{{ eos_token }}{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    ),
    "plain": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    ),
}
SPECIAL_TOKENS = {
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
}


class ChatTemplateError(ValueError):
    pass


_ENV = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)


@lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    try:
        return _ENV.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"invalid chat template: {exc}") from exc


def check_template(template: str) -> None:
    """Raise ChatTemplateError unless ``template`` is a preset or valid Jinja2."""
    if template not in PRESETS:
        _compile(template)


def text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return str(content)


def render(template: str, messages: Sequence[Mapping[str, Any]]) -> str:
    source = PRESETS.get(template, template)
    special = SPECIAL_TOKENS.get(template, {"bos_token": "", "eos_token": ""})
    plain = [
        {"role": str(m.get("role", "")), "content": text_of(m.get("content"))} for m in messages
    ]
    try:
        return str(_compile(source).render(messages=plain, add_generation_prompt=True, **special))
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
