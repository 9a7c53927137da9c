"""The router's tokenizer of prompts: a request's prompt as the engine tokenizes it.

A precise prefix index (``policies/blocks.py``) matches a prompt's token
blocks against the blocks an engine reports; so the router must see the
prompt's token ids exactly as the engine does. For vLLM's OpenAI server:

- chat: the messages rendered with the model's chat template, with
  ``add_generation_prompt`` (default true), then encoded *without* the
  tokenizer's post-processor specials (``add_special_tokens`` false: the
  template writes its own BOS);
- completions: the prompt string encoded *with* them (a Llama tokenizer's
  BOS), or the token ids the client sent.

The tokenizer and template are the model's (``models.<m>.tokenizer``: a
directory or its ``tokenizer.json``; the template found there as vLLM finds
it, ``backends.hf_model``, unless ``models.<m>.chat_template`` overrides it).
A request this module cannot reproduce (images, ``continue_final_message``,
``chat_template_kwargs``, a template that fails) gets no tokens: policies
fall back to characters.

Cost, and caching (measured in benchmarks/README.md, "Tokenizing prompts on
the request path"): a BPE tokenizer costs 0.45 to 2 us per character, 15 to
60 ms for a 32k-character prompt. Hugging Face tokenizers cut the text at added
tokens (``<|im_start|>``...) before anything else, so the pieces between
them tokenize independently: a piece seen before (a shared system prompt,
a conversation's earlier turns) is looked up in a bounded LRU of piece ->
ids, by a 128-bit hash of its text. That independence is checked when the
tokenizer loads (added tokens that strip whitespace, normalised added
tokens, or a probe whose pieces encode differently from the whole: the
prompt is then encoded whole; only a prompt seen whole before is cached).
What misses goes to a thread past ``thread_chars`` characters (tokenizers
releases the GIL), so a long new prompt does not stall the event loop; the
block hashes (``router/prompt_blocks.py``) are computed on the loop, by the
policy, for the block sizes it needs.
"""

from __future__ import annotations

import asyncio
import functools
import os
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash
from tokenizers import Tokenizer

from backends.chat_format import LoopFormat
from backends.hf_model import ModelFilesError, read_model_files
from backends.templates import MAX_SECONDS as RENDER_SECONDS
from backends.templates import (
    PRESETS,
    ChatTemplateError,
    ChatTemplateRejected,
    check_template,
    render,
)
from backends.tokens import TokenizerError, load_tokenizer
from router.prompt_blocks import ChainCache, Tokens
from router.prompt_split import AddedTokenSplitter

#: Token ids kept in the piece cache (4 bytes each).
MAX_CACHED_TOKENS = 4_000_000
#: Misses longer than this (in characters) are encoded in a thread: about
#: 0.4 ms of a BPE tokenizer's time, the most one request may hold the loop.
THREAD_CHARS = 1024
#: One formatted request in this many is also rendered with Jinja (the
#: first one included) and compared: ~0.3 us a request on average.
FORMAT_CHECK_EVERY = 64
#: The message keys a ``LoopFormat`` renders (other keys may change the
#: template's output: a name, tool calls).
_ROLE_AND_CONTENT = frozenset({"role", "content"})
#: Pieces encoded whole and compared with their concatenation when a
#: tokenizer loads: whitespace and text around added tokens.
_PROBE_TEXTS = (
    "Hello world",
    " leading space",
    "\n\ntwo newlines\n",
    "  two spaces  ",
    "x",
    "tab\there",
    "ünïcödé ☃",
    "123 4567",
    "\n",
    " ",
)


class PromptTokenizerError(Exception):
    """A model's tokenizer or chat template cannot be loaded."""


@dataclass(slots=True)
class _Plan:
    """A prompt cut into pieces, some already known (ids), some to encode."""

    keys: list[int]
    pieces: list[bytes]
    #: (position in ``pieces``, text, cache key) of the pieces to encode.
    missing: list[tuple[int, str, int]]
    missing_chars: int


def _ids(values: Sequence[int]) -> bytes:
    return array("I", values).tobytes()


def _token_id(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 32


def _text_content(content: Any) -> str | None:
    """A message's content as vLLM gives it to a template (text parts joined
    by newlines); None for content with other parts (images, audio)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                return None
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return None


#: Why a prompt could not be tokenized (``PromptTokenizer.failures``): a
#: fixed set, the metric's label values.
FAILURES = ("rejected", "failed", "encode")


class PromptTokenizer:
    """One model's tokenizer and chat template, and its caches."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        special_tokens: Mapping[str, str] | None = None,
        *,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
        thread_chars: int = THREAD_CHARS,
        render_seconds: float = RENDER_SECONDS,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.max_cached_tokens = max_cached_tokens
        self.thread_chars = thread_chars
        self.render_seconds = render_seconds
        self.chains = ChainCache()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0
        self.hits = 0
        self.misses = 0
        #: Prompts the router could not tokenize though it had to (the request
        #: then routes on characters), by cause: the template refused the
        #: conversation (``rejected``), rendering failed or ran over its
        #: budget (``failed``), the tokenizer refused the text (``encode``).
        self.failures: dict[str, int] = dict.fromkeys(FAILURES, 0)
        added = tokenizer.get_added_tokens_decoder()
        self._added = {t.content: _ids([i]) for i, t in added.items()}
        plain = not any(
            t.lstrip or t.rstrip or t.single_word or (t.normalized and tokenizer.normalizer)
            for t in added.values()
        )
        self._split = AddedTokenSplitter(self._added) if self._added else None
        self.separable = plain and self._probe()
        self._prefix, self._suffix = self._specials()
        #: The template as strings joined (backends/chat_format.py), where it
        #: is a plain loop over messages; else None (rendered with Jinja).
        self.format = (
            LoopFormat.find(chat_template, self.special_tokens or None) if chat_template else None
        )
        #: Formatted requests, one in ``FORMAT_CHECK_EVERY`` also rendered
        #: with Jinja (``check_format``): the format is dropped at the first
        #: difference.
        self.formatted = 0
        self.format_mismatches = 0
        self._unchecked: tuple[list[tuple[str, str]], bool, str] | None = None

    def _probe(self) -> bool:
        if self._split is None:
            return True
        specials = list(self._added)
        for i, text in enumerate(_PROBE_TEXTS):
            special = specials[i % len(specials)]
            whole = f"{text}{special}{text}{special}{special}{_PROBE_TEXTS[-1 - i]}"
            if self._encode_pieces(whole) != _ids(self._encode(whole)):
                return False
        return True

    def _encode(self, text: str, special: bool = False) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=special).ids
        return ids

    def _encode_pieces(self, text: str) -> bytes:
        assert self._split is not None
        return b"".join(
            self._added.get(piece) or _ids(self._encode(piece))
            for piece in self._split.split(text)
            if piece
        )

    def _specials(self) -> tuple[bytes, bytes]:
        """What the post-processor adds around a sequence (a BOS, an EOS)."""
        plain = self._encode("a")
        full = self._encode("a", special=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return _ids(full[:start]), _ids(full[start + len(plain) :])
        return b"", b""

    # -- a request's prompt ------------------------------------------------------

    def prompt(self, op: str, body: Mapping[str, Any]) -> tuple[str, bool] | list[int] | None:
        """The text to encode and whether to add the post-processor's specials,
        or the token ids the client sent; None when the router cannot tell."""
        if op == "chat":
            return self._chat(body)
        if op == "completion":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                return prompt, True
            if isinstance(prompt, list) and prompt and all(_token_id(t) for t in prompt):
                return list(prompt)
        return None

    def _chat(self, body: Mapping[str, Any]) -> tuple[str, bool] | None:
        messages = body.get("messages")
        if self.chat_template is None or not isinstance(messages, list):
            return None
        # Template arguments the router does not pass on (vLLM's
        # chat_template_kwargs, documents) would render another prompt.
        if body.get("continue_final_message") or body.get("chat_template_kwargs"):
            return None
        tools = body.get("tools")
        generation = bool(body.get("add_generation_prompt", True))
        if self.format is not None and tools is None:
            text = self._formatted(messages, generation)
            if text is not None:
                return text, bool(body.get("add_special_tokens", False))
        plain = []
        for m in messages:
            if not isinstance(m, Mapping):
                return None
            content = _text_content(m.get("content"))
            if content is None and m.get("content") is not None:
                return None
            plain.append({**m, "content": content or ""})
        text = self._render(plain, tools if isinstance(tools, list) else None, generation)
        if text is None:
            return None
        return text, bool(body.get("add_special_tokens", False))

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        generation: bool,
        counted: bool = True,
    ) -> str | None:
        """The template's text, or None (``counted``: a request's prompt, whose
        failure is counted in ``failures``; not the format's check)."""
        assert self.chat_template is not None
        try:
            return render(
                self.chat_template,
                messages,
                tools=tools,
                add_generation_prompt=generation,
                special_tokens=self.special_tokens or None,
                max_seconds=self.render_seconds,
            )
        except ChatTemplateError as exc:
            if counted:
                reason = "rejected" if isinstance(exc, ChatTemplateRejected) else "failed"
                self.failures[reason] += 1
            return None

    def _formatted(self, messages: list[Any], generation: bool) -> str | None:
        """The messages through the template's ``LoopFormat``; None where it
        does not apply (a message with other keys than role and content, a
        role it has no texts for, content other than text)."""
        fmt = self.format
        assert fmt is not None
        pairs = []
        for m in messages:
            if not isinstance(m, Mapping) or not _ROLE_AND_CONTENT.issuperset(m):
                return None
            role, raw = m.get("role"), m.get("content")
            content = _text_content(raw)
            if type(role) is not str or (content is None and raw is not None):
                return None
            pairs.append((role, content or ""))
        text = fmt.format(pairs, generation)
        if text is None:
            return None
        self.formatted += 1
        if self.formatted % FORMAT_CHECK_EVERY == 1:
            self._unchecked = (pairs, generation, text)
        return text

    def check_format(self) -> None:
        """Render the last request due a check (the first formatted one and
        one in ``FORMAT_CHECK_EVERY``) with Jinja, and drop the format if the
        texts differ. Off the decision path: the router calls it once the
        request is on its way (``tokens_async``), since rendering a long
        prompt costs ~20 us, and the check only guards later requests."""
        due, self._unchecked = self._unchecked, None
        if due is None or self.format is None:
            return
        pairs, generation, text = due
        messages = [{"role": r, "content": c} for r, c in pairs]
        rendered = self._render(messages, None, generation, counted=False)
        # A conversation the template refuses says nothing about the format.
        if rendered is not None and rendered != text:
            # Dropped for every later request: a client whose content steers
            # the template (a branch on the content) costs the router the
            # fast path, and the requests since the last check a prompt
            # routed on the format's text (a routing choice, never what is
            # forwarded: the engine renders its own template).
            self.format = None
            self.format_mismatches += 1

    def plan(self, text: str, special: bool) -> _Plan:
        """``text`` as pieces: the cached ones with their ids, the others to encode."""
        # Split on a capturing group: odd items are the added tokens.
        splitter = self._split if self.separable else None
        split = splitter.split(text) if splitter is not None else [text]
        keys: list[int] = []
        pieces: list[bytes] = []
        missing: list[tuple[int, str, int]] = []
        chars = 0
        digest64 = xxhash.xxh3_64_intdigest
        key = 0x7072_6F6D_7074 if special else 0
        if special and self._prefix:
            key = digest64(self._prefix, key)
            keys.append(key)
            pieces.append(self._prefix)
        cache = self._cache
        added = self._added
        for i, part in enumerate(split):
            if not part:
                continue
            if i & 1:
                ids = added[part]
                key = digest64(ids, key)
                keys.append(key)
                pieces.append(ids)
                continue
            # The text's 128-bit hash names it in the cache (no str hash of
            # a 32k-character piece, no copy of it kept).
            digest = xxhash.xxh3_128_intdigest(part.encode("utf-8", "surrogatepass"))
            key = digest64(digest.to_bytes(16, "little"), key)
            keys.append(key)
            cached = cache.get(digest)
            if cached is None:
                missing.append((len(pieces), part, digest))
                chars += len(part)
                cached = b""
                self.misses += 1
            else:
                cache.move_to_end(digest)
                self.hits += 1
            pieces.append(cached)
        if special and self._suffix:
            key = digest64(self._suffix, key)
            keys.append(key)
            pieces.append(self._suffix)
        return _Plan(keys, pieces, missing, chars)

    def encode_missing(self, plan: _Plan) -> list[bytes]:
        """The missing pieces' ids; touches no shared state (runs in a thread).

        One piece a call: a batch of several wakes tokenizers' thread pool,
        which cost 30-200 us for three short pieces against 11 us each alone
        (``encode_batch_fast`` skips the offsets ``encode`` computes)."""
        encode = self.tokenizer.encode_batch_fast
        return [
            _ids(encode([text], add_special_tokens=False)[0].ids) for _, text, _ in plan.missing
        ]

    def finish(self, plan: _Plan, encoded: list[bytes]) -> Tokens:
        for (position, _, digest), ids in zip(plan.missing, encoded, strict=True):
            plan.pieces[position] = ids
            self._remember(digest, ids)
        return Tokens(plan.keys, plan.pieces, self.chains)

    def _remember(self, digest: int, ids: bytes) -> None:
        limit = self.max_cached_tokens * 4
        if len(ids) > limit or digest in self._cache:
            return
        self._cache[digest] = ids
        self._cached_bytes += len(ids)
        while self._cached_bytes > limit:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= len(dropped)

    @property
    def cached_tokens(self) -> int:
        return self._cached_bytes // 4

    def _from_ids(self, ids: list[int]) -> Tokens:
        data = _ids(ids)
        return Tokens([xxhash.xxh3_64_intdigest(data, seed=1)], [data], self.chains)

    def _planned(self, op: str, body: Mapping[str, Any]) -> Tokens | _Plan | None:
        """Token ids given as the prompt, or the plan to encode its text."""
        prompt = self.prompt(op, body)
        if prompt is None:
            return None
        if isinstance(prompt, list):
            return self._from_ids(prompt)
        return self.plan(*prompt)

    def tokens(self, op: str, body: Mapping[str, Any]) -> Tokens | None:
        """The request's prompt tokens, computed here and now."""
        plan = self._planned(op, body)
        if not isinstance(plan, _Plan):
            return plan
        self.check_format()
        try:
            encoded = self.encode_missing(plan)
        except Exception:  # text tokenizers refuse (lone surrogates): route on characters
            self.failures["encode"] += 1
            return None
        return self.finish(plan, encoded)

    async def tokens_async(self, op: str, body: Mapping[str, Any]) -> Tokens | None:
        """As ``tokens``, encoding a long miss in a thread, and the format's
        check left to run once this request has gone on (its next await)."""
        plan = self._planned(op, body)
        if self._unchecked is not None:
            asyncio.get_running_loop().call_soon(self.check_format)
        if not isinstance(plan, _Plan):
            return plan
        try:
            if plan.missing_chars > self.thread_chars:
                encoded = await asyncio.to_thread(self.encode_missing, plan)
            else:
                encoded = self.encode_missing(plan)
        except Exception:  # text tokenizers refuse (lone surrogates): route on characters
            self.failures["encode"] += 1
            return None
        return self.finish(plan, encoded)


def load_prompt_tokenizer(path: str, chat_template: str | None = None) -> PromptTokenizer:
    """A model's prompt tokenizer from its directory (or ``tokenizer.json``),
    built once per version of the files and template."""
    try:
        files = read_model_files(path)
        stat = os.stat(files.tokenizer_json)
    except (ModelFilesError, OSError) as exc:
        raise PromptTokenizerError(str(exc)) from None
    template = chat_template if chat_template is not None else files.chat_template
    if template is not None:
        try:
            check_template(template)
        except ChatTemplateError as exc:
            raise PromptTokenizerError(f"{files.tokenizer_json.parent}: {exc}") from None
    bos, eos = files.bos_token or "", files.eos_token or ""
    return _build(str(files.tokenizer_json), stat.st_mtime_ns, stat.st_size, template, bos, eos)


@functools.lru_cache(maxsize=16)
def _build(
    path: str, mtime_ns: int, size: int, template: str | None, bos: str, eos: str
) -> PromptTokenizer:
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as exc:
        raise PromptTokenizerError(str(exc)) from None
    # A preset brings its own special tokens; a template source uses the model's.
    special = None if template in PRESETS else {"bos_token": bos, "eos_token": eos}
    return PromptTokenizer(tokenizer, template, special)
