"""Where an endpoint came from: the config file, or a discovery source.

Discovery asks the registry for its endpoints by ``Source``, never by
parsing endpoint ids.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SourceKind(enum.Enum):
    STATIC = "static"
    CONSUL = "consul"


@dataclass(frozen=True, slots=True)
class Source:
    kind: SourceKind
    #: The discovered service the endpoint belongs to (None for the config file).
    service: str | None = None

    @classmethod
    def consul(cls, service: str) -> Source:
        return cls(SourceKind.CONSUL, service)

    def __str__(self) -> str:
        return self.kind.value if self.service is None else f"{self.kind.value}:{self.service}"


STATIC = Source(SourceKind.STATIC)
