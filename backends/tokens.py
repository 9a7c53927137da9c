"""Token counts kvroute makes itself, where the engine reports none.

Clients bill and rate-limit on ``usage``, so an answer never reports 0
tokens for a text that is not empty. Each number comes from the best source
there is, in this order:

1. the engine's own count (the adapters read it off the answer);
2. the model's tokenizer, a Hugging Face ``tokenizer.json`` named on the
   model (``models: [{name: m, tokenizer: path}]``);
3. an estimate: one token per 4 characters, rounded up (at least 1 for any
   text that is not empty).

A ``Usage`` with a number from 2 or 3 says ``estimated=True``: kvroute
counted it, not the engine.

Tokenizers are loaded when the config is validated (off the event loop on a
reload, by ``kvroute check`` too) and kept per version of the file, so a
request never loads one; counting costs the event loop about 2 ms for a
2k-token prompt (see the README).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError
from tokenizers import Tokenizer

from backends.base import Usage

#: Characters per token for the estimate; about right for English prose
#: with today's BPE vocabularies, and the ratio OpenAI documents.
CHARS_PER_TOKEN = 4


class TokenizerError(Exception):
    """A configured tokenizer file cannot be read or parsed."""


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in ``path``, loaded once per version of the file."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise TokenizerError(f"cannot read tokenizer '{path}': {exc.strerror or exc}") from None
    return _load(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime_ns: int, size: int) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the tokenizers library raises bare Exceptions
        raise TokenizerError(f"cannot parse tokenizer '{path}': {exc}") from None


def _loadable(path: str) -> str:
    try:
        load_tokenizer(path)
    except TokenizerError as exc:
        raise PydanticCustomError("tokenizer", "{error}", {"error": str(exc)}) from None
    return path


#: A config field naming a tokenizer file, loaded (and so checked) when validated.
TokenizerFile = Annotated[str, AfterValidator(_loadable)]


def estimate(text: str) -> int:
    """ceil(characters / 4): 0 for "", at least 1 for anything else."""
    return -(-len(text) // CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class TokenCounter:
    """Counts what the engine did not, for one exchange."""

    tokenizer: Tokenizer | None = None
    #: Whether the engine adds special tokens (BOS, ...) to the prompt it is
    #: given: TGI does; TensorRT-LLM's preprocessing model does not by default.
    prompt_special_tokens: bool = False

    def count(self, text: str, special_tokens: bool = False) -> int:
        if not text:
            return 0
        if self.tokenizer is None:
            return estimate(text)
        # A normaliser may drop a text entirely; it was still generated.
        return max(1, len(self.tokenizer.encode(text, add_special_tokens=special_tokens)))

    def usage(
        self,
        prompt: str,
        completion: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> Usage:
        """Usage from the engine's counts (None: it gave none), completed by
        counting ``prompt`` and ``completion`` where it said nothing, or 0
        for a text that is not empty."""
        estimated = False
        if prompt_tokens is None or (prompt_tokens <= 0 and prompt):
            prompt_tokens = self.count(prompt, self.prompt_special_tokens)
            estimated = True
        if completion_tokens is None or (completion_tokens <= 0 and completion):
            completion_tokens = self.count(completion)
            estimated = True
        return Usage(prompt_tokens, completion_tokens, None, estimated)
