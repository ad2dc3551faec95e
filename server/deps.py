"""Dependencies as `Annotated` aliases, so handler signatures read as plain types; and the key
check, which runs before anything else (`ApiKeyGuard`)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from server.http_errors import error_body
from server.settings import Settings
from server.state import ServerState

# /health: load balancers probe it without a key. The playground page and its files hold no
# data, and the key is typed into the page, so they load without one (every call it makes
# carries the key).
OPEN_PATHS = frozenset({"/health", "/", "/playground", "/playground/app.js", "/playground/style.css"})


def get_state(request: Request) -> ServerState:
    return request.state.fsrl  # put there by the app's lifespan


StateDep = Annotated[ServerState, Depends(get_state)]


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str | None, key: SecretStr | None) -> bool:
    return (token is not None and key is not None
            and hmac.compare_digest(token.encode(), key.get_secret_value().encode()))


def _is_admin_route(method: str, path: str) -> bool:
    """Adapter load, replace and unload."""
    return (method == "POST" and path.rstrip("/") == "/adapters") or \
        (method == "DELETE" and path.startswith("/adapters/"))


class ApiKeyGuard:
    """With FSRL_API_KEY set, every route but /health and the playground page (the docs and
    the schema included, and paths that do not exist) needs `Authorization: Bearer <key>` (or the admin key): 401
    before the body is read. With FSRL_ADMIN_KEY set, adapter load, replace and unload need
    that key: 403. Pure ASGI, in front of everything but the request counter."""

    def __init__(self, app, settings: Settings) -> None:
        self.app, self.api_key, self.admin_key = app, settings.api_key, settings.admin_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not (self.api_key or self.admin_key):
            return await self.app(scope, receive, send)
        token = _bearer(dict(scope.get("headers") or ()))
        admin = _matches(token, self.admin_key)
        openai = scope["path"].startswith("/v1/")
        if self.api_key is not None and not (admin or _matches(token, self.api_key)):
            response = JSONResponse(
                error_body("missing or invalid API key: send Authorization: Bearer <key>",
                           "authentication_error", "invalid_api_key", None, openai),
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if self.admin_key is not None and not admin and _is_admin_route(scope["method"], scope["path"]):
            response = JSONResponse(
                error_body("this route needs the admin key: send Authorization: Bearer <admin key>",
                           "permission_error", "forbidden", None, openai), status_code=403)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
