"""A Hugging Face model directory's tokenizer files, read as vLLM reads them.

vLLM (through ``transformers``) tokenizes with ``tokenizer.json`` and renders
chats with the model's own chat template: ``chat_template.jinja`` beside the
tokenizer when there is one (``transformers`` >= 4.43 saves it there), else
``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named
templates of which "default" is used). ``bos_token`` and ``eos_token`` come
from ``tokenizer_config.json`` too (a string or an ``{"content": ...}`` entry).

``path`` may name the directory or its ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelFilesError(Exception):
    """The directory's files cannot be read or make no sense."""


@dataclass(frozen=True, slots=True)
class ModelFiles:
    tokenizer_json: Path
    #: The template's Jinja source; None when the model ships none.
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


def _token(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def read_model_files(path: str | Path) -> ModelFiles:
    """The tokenizer, chat template and special tokens of a model directory."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    tokenizer_json = directory / "tokenizer.json" if p.is_dir() else p
    if not tokenizer_json.is_file():
        raise ModelFilesError(f"no tokenizer.json at '{tokenizer_json}'")
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"cannot read '{config_path}': {exc}") from None
        if isinstance(loaded, dict):
            config = loaded
    template: str | None = None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelFilesError(f"cannot read '{jinja}': {exc}") from None
    if template is None:
        template = _template(config.get("chat_template"))
    return ModelFiles(
        tokenizer_json=tokenizer_json,
        chat_template=template,
        bos_token=_token(config.get("bos_token")),
        eos_token=_token(config.get("eos_token")),
    )
