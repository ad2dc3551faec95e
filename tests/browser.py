"""Headless Chromium driven by Playwright, for the playground's tests and its screenshots.

The browser is Debian's `chromium` (`make browser` installs it); Playwright's own browser
download is never used (this machine has no route to it)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
# Headless as root in a container; the background-networking flags keep Chromium from dialling
# Google's hosts, which a closed network refuses at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (make browser installs Debian's chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (it is in the dev extra: pip install -e '.[dev]')"
    return None


@contextmanager
def chromium() -> Iterator["Browser"]:
    """A headless Chromium, closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()
