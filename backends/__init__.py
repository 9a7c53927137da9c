"""Backend adapters, one per wire protocol, and the simulated backends."""

from backends.base import Adapter, Load, StreamTranslator, UpstreamRequest
from backends.openai import OpenAIAdapter, VLLMAdapter

ADAPTERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
    "vllm": VLLMAdapter(),
}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Load",
    "OpenAIAdapter",
    "StreamTranslator",
    "UpstreamRequest",
    "VLLMAdapter",
]
