"""Who is calling: API keys -> tenants, and what each tenant may use.

Keys are stored only as hashes (``sha256:<hex>``). kvroute's keys are 32
random bytes, so a plain SHA-256 is the right hash (as GitHub and Stripe do
for tokens): a slow password hash adds nothing against guessing 256 bits
and would cost milliseconds per request. A presented key is hashed, looked
up by its digest, and the stored digest compared with ``hmac.compare_digest``;
the lookup itself can only leak timing about a digest, never about a key.

Clients send keys as OpenAI's SDKs do: ``Authorization: Bearer <key>``, or
Azure's ``api-key: <key>``. With ``auth.enabled`` false every request is the
``anonymous`` tenant (the demo).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.config import ANONYMOUS, Config, TenantConfig
from router.errors import AuthError, RouterError

if TYPE_CHECKING:
    from router.pipeline_types import Handler
    from router.request import InferenceRequest
    from router.state import AppState
    from router.types import Send

#: A key longer than this is no kvroute key (and is not hashed).
MAX_KEY_CHARS = 256
KEY_PREFIX = "kvr-"

_AUTHORIZATION = b"authorization"
_API_KEY = b"api-key"


def hash_key(key: str) -> str:
    """The form a key is stored in: ``sha256:`` and the hex digest."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: ``kvr-`` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


class MissingKey(AuthError):
    code = "missing_api_key"


class ModelNotAllowed(RouterError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


@dataclass(eq=False, slots=True)
class Tenant:
    name: str
    config: TenantConfig
    #: Model names this tenant may use, by name (decided once per model).
    _allowed: dict[str, bool] = field(default_factory=dict)

    @property
    def priority(self) -> str:
        return self.config.priority

    def may_use(self, model: str, aliases: Iterable[str] = ()) -> bool:
        """Whether one of the tenant's patterns matches the model's name or an
        alias of it (a pattern naming an alias grants the model behind it)."""
        known = self._allowed.get(model)
        if known is None:
            names = (model, *aliases)
            known = any(fnmatch.fnmatchcase(n, p) for p in self.config.models for n in names)
            if len(self._allowed) < 10_000:
                self._allowed[model] = known
        return known


class Tenants:
    """The tenants of one config, and the keys that name them."""

    def __init__(self, config: Config) -> None:
        self.enabled = config.auth.enabled
        self.anonymous = Tenant(ANONYMOUS, config.auth.anonymous)
        self.by_name: dict[str, Tenant] = {}
        if self.enabled:
            self.by_name = {name: Tenant(name, tc) for name, tc in config.tenants.items()}
        else:
            self.by_name = {ANONYMOUS: self.anonymous}
        self._by_digest: dict[bytes, tuple[bytes, Tenant]] = {}
        for tenant in self.by_name.values():
            for stored in tenant.config.keys:
                digest = bytes.fromhex(stored.removeprefix("sha256:"))
                self._by_digest[digest] = (digest, tenant)

    def names(self) -> list[str]:
        return list(self.by_name)

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Tenant:
        """The tenant whose key the request carries; ``AuthError`` (401) if none."""
        if not self.enabled:
            return self.anonymous
        key = presented_key(headers)
        if key is None:
            raise MissingKey(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "(or in an 'api-key' header)."
            )
        if len(key) <= MAX_KEY_CHARS:
            digest = hashlib.sha256(key).digest()
            found = self._by_digest.get(digest)
            if found is not None and hmac.compare_digest(found[0], digest):
                return found[1]
        # Never echo the key, not even a part of it.
        raise AuthError("Incorrect API key provided.")


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key in ``Authorization: Bearer`` or ``api-key`` (ASGI headers)."""
    api_key = None
    for name, value in headers:
        if name == _AUTHORIZATION:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == _API_KEY and value.strip():
            api_key = value.strip()
    return api_key


class Authorize:
    """The stage after Resolve: 403 for a model the tenant may not use."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, request: InferenceRequest, send: Send, call_next: Handler) -> None:
        tenant = request.ctx.tenant
        model = request.routed.model
        if tenant is not None and not tenant.may_use(model, self.state.routes.aliases(model)):
            raise ModelNotAllowed(
                f"Tenant '{tenant.name}' may not use the model `{model}`.", param="model"
            )
        await call_next(request, send)
