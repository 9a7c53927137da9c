"""Backend adapters, one per wire protocol, and the simulated backends.

``ADAPTERS`` maps an endpoint's ``kind`` to the factory of its adapter: the
model of its ``options`` (validated with the config) and a constructor.
"""

from backends.base import (
    Adapter,
    AdapterFactory,
    Exchange,
    Load,
    NoOptions,
    OpenAIRequest,
    Operation,
    Sampling,
    Target,
    Translator,
    UpstreamProtocolError,
    Usage,
)
from backends.openai import OpenAIAdapter, VLLMAdapter
from backends.tgi import TGIAdapter, TGIOptions
from backends.triton import TritonAdapter, TritonOptions

ADAPTERS: dict[str, AdapterFactory] = {
    "openai": AdapterFactory(NoOptions, lambda options: OpenAIAdapter()),
    "vllm": AdapterFactory(NoOptions, lambda options: VLLMAdapter()),
    "tgi": AdapterFactory(TGIOptions, TGIAdapter),
    "triton": AdapterFactory(TritonOptions, TritonAdapter),
}


def build_adapter(kind: str, options: object) -> Adapter:
    """An adapter from raw options (the config validates them once and builds
    with ``ADAPTERS[kind].build`` itself; this is for tools and tests)."""
    factory = ADAPTERS[kind]
    return factory.build(factory.options_model.model_validate(options))


__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterFactory",
    "Exchange",
    "Load",
    "OpenAIAdapter",
    "OpenAIRequest",
    "Operation",
    "Sampling",
    "TGIAdapter",
    "Target",
    "Translator",
    "TritonAdapter",
    "UpstreamProtocolError",
    "Usage",
    "VLLMAdapter",
    "build_adapter",
]
