"""The browser playground: one HTML page, its script and its stylesheet, served from package
data (`server/playground/`). No build step and no CDN: the page only talks to this server.

These paths need no API key (see `deps.OPEN_PATHS`): the page holds no data, and the key is
typed into it, so the page must load before the key is known."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from fsrl.errors import NotFoundError

router = APIRouter(tags=["playground"], include_in_schema=False)

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Only this server's own script, style and API: a label or context shown on the page can never
# load or run anything else.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _read(name: str) -> bytes:
    # Read per request (a few tens of kB, once per visit): an edited page shows without a restart.
    return (files("server") / "playground" / name).read_bytes()


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> RedirectResponse:
    return RedirectResponse("/playground")


@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:  # a fixed list: no path from the client reaches the file system
        raise NotFoundError(f"no playground file {name!r}")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
