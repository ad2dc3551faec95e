"""Dependencies as `Annotated` aliases, so handler signatures read as plain types."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from fsrl.errors import ForbiddenError
from server.errors import Unauthorized
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.state.fsrl  # put there by the app's lifespan


StateDep = Annotated[ServerState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str | None, key: SecretStr | None) -> bool:
    return (token is not None and key is not None
            and hmac.compare_digest(token.encode(), key.get_secret_value().encode()))


def require_api_key(request: Request, state: StateDep) -> None:
    """With FSRL_API_KEY set, a bearer token must be the API key (or the admin key)."""
    settings = state.settings
    if settings.api_key is None:
        return
    token = _bearer(request)
    if not (_matches(token, settings.api_key) or _matches(token, settings.admin_key)):
        raise Unauthorized("missing or invalid API key: send Authorization: Bearer <key>")


def require_admin_key(request: Request, state: StateDep) -> None:
    """With FSRL_ADMIN_KEY set, adapter load, replace and unload need it."""
    if state.settings.admin_key is None:
        return
    if not _matches(_bearer(request), state.settings.admin_key):
        raise ForbiddenError("this route needs the admin key: send Authorization: Bearer <admin key>")


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
