"""kvroute's router process: the ASGI app, request pipeline, registry, config, CLI."""

from router.app import build_app
from router.config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "build_app", "load_config", "parse_config"]
