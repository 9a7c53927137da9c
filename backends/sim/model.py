"""A real model's tokenizer and chat template, used as vLLM uses them.

Given a model directory (or its ``tokenizer.json``), the simulator counts
tokens and hashes KV blocks exactly as a vLLM server of that model does:

- chats are rendered with the model's own chat template
  (``chat_template.jinja`` beside the tokenizer, else ``chat_template`` in
  ``tokenizer_config.json``; backends/hf_model.py finds them as vLLM does), with
  the model's ``bos_token``/``eos_token`` in the template's context, and the
  rendered text is encoded *without* special tokens (vLLM's chat endpoint: the
  template already wrote them);
- completion prompts are encoded *with* special tokens (vLLM's default for
  ``/v1/completions``): whatever the tokenizer's post-processor adds, e.g. a
  Llama-3 ``<|begin_of_text|>``, is counted and cached.

A model without a chat template falls back to ChatML (the built-in simulated
models' template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends import templates
from backends.hf_model import read_model_files
from backends.sim.tokenizer import render_chatml

#: How long a chat's rendering may take. vLLM sets no bound: its template is
#: the operator's, not the client's, and it renders however long that takes.
#: templates.render's default (0.1 s of the thread's CPU time, kvroute's
#: bound on its event loop) answered one ordinary chat in thousands with a 400
#: in benchmarks/replicas.py --sim (16 simulators and 4 routers on two cores,
#: load average under 1), most likely a full garbage collection of that
#: process (simulators, routers and client in one) landing inside the
#: render. This one only stops a template that would never finish.
RENDER_SECONDS = 30.0


class SimModel:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer  # optional dependency: only with a real model

        files = read_model_files(path)
        self.tokenizer: Any = Tokenizer.from_file(str(files.tokenizer_json))
        self.chat_template = files.chat_template
        self.special_tokens = {
            "bos_token": files.bos_token or "",
            "eos_token": files.eos_token or "",
        }

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt vLLM renders for ``messages`` (with the generation prompt).
        Raises templates.ChatTemplateRejected / ChatTemplateFailed."""
        if self.chat_template is None:
            return render_chatml(messages)
        return templates.render(
            self.chat_template,
            messages,
            special_tokens=self.special_tokens,
            max_seconds=RENDER_SECONDS,
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids
