"""Chat templates: OpenAI messages -> one prompt string, for backends that take
text (TGI's native API, Triton/TensorRT-LLM).

A template is a named preset or Jinja2 source in Hugging Face's
``chat_template`` dialect, rendered the way ``transformers``'
``apply_chat_template`` renders it: an immutable sandbox with ``trim_blocks``,
``lstrip_blocks``, ``{% break %}``/``{% continue %}`` and a pass-through
``{% generation %}`` tag; in the context ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``raise_exception(message)``, ``strftime_now(format)``, and a ``tojson`` filter
that does not escape HTML and takes ``indent``, ``separators``, ``sort_keys``.

Rendering runs on the event loop, so it is bounded from inside the sandbox
(a thread could not be stopped): every loop iteration and every call checks a
deadline, and ``*``, ``**``, ``+`` refuse results longer than the output bound,
which the rendered text must also fit. The deadline is the render's own CPU
time: a wall clock past it (a cheap check) is confirmed by the thread's CPU
clock (a system call), so a render preempted on a loaded machine is not cut
short and the request does not lose its tokens (it did, on a machine running
other work: benchmarks/README.md, "Decision latency, fourth pass").

Exceptions::

    ChatTemplateError (ValueError)   invalid template source (check_template)
     ├── ChatTemplateRejected        the template called raise_exception(): the
     │                               conversation is the client's fault (400)
     └── ChatTemplateFailed          anything else while rendering, exceeding the
                                     bounds included: the endpoint's fault

``render`` raises only the two subclasses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from datetime import datetime
from functools import lru_cache
from time import perf_counter, thread_time
from typing import Annotated, Any

from jinja2 import Template, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from backends.openai_shapes import MAX_ERROR_MESSAGE

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
_NO_SPECIAL_TOKENS = {"bos_token": "", "eos_token": ""}

#: Default time budget of one render. Presets take ~10 us on a 5-message chat
#: and real templates well under 1 ms; 0.1 s leaves that a wide margin while
#: bounding how long one request can stall the event loop.
MAX_SECONDS = 0.1
#: Default output bound: the client's text times OUTPUT_GROWTH plus
#: OUTPUT_SLACK. Proportional because request bodies may be large (32 MiB by
#: default) and a prompt legitimately contains all of their text; the slack
#: covers what templates add (role markers, system prompts, tool schemas).
OUTPUT_GROWTH = 4
OUTPUT_SLACK = 1 << 20
#: Integer results of ``*`` and ``**`` are capped too: computing a huge power
#: cannot be interrupted, and Python will not print an int past 4300 digits.
_MAX_INT_BITS = 1 << 16

# Keys no template can name: context variables and filters the sandbox uses.
_BUDGET = "kvroute.budget"
_LOOP_GUARD = "kvroute.loop"


class ChatTemplateError(ValueError):
    """A chat template is invalid (base of the rendering errors below)."""


class ChatTemplateRejected(ChatTemplateError):
    """The template refused the conversation through ``raise_exception``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ChatTemplateFailed(ChatTemplateError):
    """Rendering failed for a reason of the template's own, or exceeded a bound."""


class _Budget:
    __slots__ = ("cpu_deadline", "deadline", "max_chars", "max_seconds")

    def __init__(self, max_seconds: float, max_chars: int) -> None:
        self.max_seconds = max_seconds
        self.max_chars = max_chars
        self.deadline = perf_counter() + max_seconds
        self.cpu_deadline = thread_time() + max_seconds

    def spent(self) -> bool:
        """Past the deadline in CPU time (the wall clock is checked first, and
        while it is not past, the CPU time cannot be)."""
        return perf_counter() > self.deadline and thread_time() > self.cpu_deadline

    def out_of_time(self) -> ChatTemplateFailed:
        return ChatTemplateFailed(f"chat template ran longer than {self.max_seconds:g} s")

    def too_long(self, size: int) -> ChatTemplateFailed:
        return ChatTemplateFailed(
            f"chat template made a value of length {size}, over the bound of {self.max_chars}"
        )


class _GuardedLoop:
    """A loop's iterable, checking the deadline before every item."""

    __slots__ = ("_budget", "_items")

    def __init__(self, items: Iterable[Any], budget: _Budget) -> None:
        self._items = items
        self._budget = budget

    def __len__(self) -> int:  # keeps loop.length and loop.last as cheap as before
        return len(self._items)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        budget = self._budget
        for item in self._items:
            if budget.spent():
                raise budget.out_of_time()
            yield item


@pass_context
def _guard_loop(context: Context, items: Iterable[Any]) -> _GuardedLoop:
    return _GuardedLoop(items, context.parent[_BUDGET])


class _CodeGenerator(CodeGenerator):
    # An empty loop body makes no call a sandbox can intercept, so every
    # ``{% for %}`` iterates through _guard_loop.
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            guarded = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
            loop.iter = guarded.set_environment(self.environment)
        super().visit_Template(node, frame)


def _sized(value: Any) -> bool:
    return isinstance(value, (str, list, tuple))


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+"})

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # A flat dict instead of jinja2's ChainMap: every render copies a
        # template's globals, and copying a ChainMap was over half of a render.
        # Our globals are set once, before any template is compiled.
        return {**self.globals, **(d or {})}

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget: _Budget = context.parent[_BUDGET]
        if budget.spent():
            raise budget.out_of_time()
        value = super().call(context, obj, *args, **kwargs)
        if isinstance(value, (str, list)) and len(value) > budget.max_chars:
            raise budget.too_long(len(value))
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget: _Budget = context.parent[_BUDGET]
        size = 0
        if operator == "+":
            if _sized(left) and _sized(right):
                size = len(left) + len(right)
        elif isinstance(left, int) and isinstance(right, int):
            if operator == "*":
                bits = left.bit_length() + right.bit_length()
            else:
                bits = left.bit_length() * right if abs(left) > 1 and right > 0 else 0
            if bits > _MAX_INT_BITS:
                raise ChatTemplateFailed(f"chat template made an integer of {bits} bits")
        elif operator == "*":
            if _sized(left) and isinstance(right, int):
                size = len(left) * right
            elif isinstance(left, int) and _sized(right):
                size = left * len(right)
        if size > budget.max_chars:
            raise budget.too_long(size)
        return self.binop_table[operator](left, right)


class _GenerationTag(Extension):
    """``{% generation %}`` marks assistant text for training masks; here it
    renders its body, as transformers does outside of mask tracking."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: Any) -> None:
    # The message may hold the client's words (a role, a content): cut, as a backend's are.
    raise ChatTemplateRejected(str(message)[:MAX_ERROR_MESSAGE])


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
_ENV.filters.update({"tojson": _tojson, _LOOP_GUARD: _guard_loop})
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)


@lru_cache(maxsize=64)
def _compile(source: str) -> Template:
    try:
        return _ENV.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"invalid chat template: {exc}") from exc


def check_template(template: str) -> None:
    """Raise ChatTemplateError unless ``template`` is a preset or valid Jinja2."""
    if template not in PRESETS:
        _compile(template)


def _checked(template: str) -> str:
    try:
        check_template(template)
    except ChatTemplateError as exc:
        raise PydanticCustomError("chat_template", "{error}", {"error": str(exc)}) from None
    return template


#: A config field holding a chat template, checked when the config loads.
ChatTemplate = Annotated[str, AfterValidator(_checked)]


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


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    max_seconds: float = MAX_SECONDS,
    max_chars: int | None = None,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """Render ``messages`` (content flattened to text, other keys kept) with a
    preset or template source, followed by the generation prompt (unless
    ``add_generation_prompt`` is false).

    ``special_tokens`` (``bos_token``, ``eos_token``) are the model's own, as
    ``transformers`` passes them to its template; by default a preset's, or
    empty strings.

    ``max_chars`` (default: OUTPUT_GROWTH x the messages' text + OUTPUT_SLACK)
    bounds the prompt and every string or list the template builds;
    ``max_seconds`` bounds the rendering time. Raises ChatTemplateRejected or
    ChatTemplateFailed.
    """
    plain = []
    chars = 0
    for m in messages:
        content = text_of(m.get("content"))
        chars += len(content)
        plain.append({**m, "role": str(m.get("role", "")), "content": content})
    try:
        compiled = _compile(PRESETS.get(template, template))
    except ChatTemplateError as exc:
        raise ChatTemplateFailed(str(exc)) from exc
    if max_chars is None:
        max_chars = OUTPUT_GROWTH * chars + OUTPUT_SLACK
    budget = _Budget(max_seconds, max_chars)
    context = {
        "messages": plain,
        "tools": tools,
        "documents": documents,
        "add_generation_prompt": add_generation_prompt,
        **SPECIAL_TOKENS.get(template, _NO_SPECIAL_TOKENS),
        **(special_tokens or {}),
        _BUDGET: budget,
    }
    parts = []
    size = 0
    try:
        for part in compiled.generate(context):
            size += len(part)
            if size > max_chars:
                raise ChatTemplateFailed(f"chat template output exceeded {max_chars} characters")
            parts.append(part)
    except ChatTemplateError:
        raise
    except Exception as exc:  # the template is foreign code: any error is its own
        failure = f"chat template failed: {type(exc).__name__}: {exc}"
        raise ChatTemplateFailed(failure[:MAX_ERROR_MESSAGE]) from exc
    return "".join(parts)
