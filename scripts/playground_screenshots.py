"""The playground at work, as the PNGs in docs/: an A/B run with a clamp, and a sweep.

    python scripts/playground_screenshots.py [--out docs] [--url http://127.0.0.1:8000] [--max-new-tokens 48]

Without --url it starts `fsrl serve` on the default model with the shipped adapters (CPU,
loopback, a free port) and stops it by its PID. Drives Debian's chromium headless through
Playwright (fsrl/testing/__init__.py), as the playground's tests do. On two CPU cores it takes a few
minutes, most of it generation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsrl.testing.server_process import ServerProcess
from fsrl.testing import browser_missing, headless_chromium

REPO = Path(__file__).resolve().parents[1]

PROMPT = "How do I make a good cup of tea?"
WAIT_MS = 600_000  # a CPU shared with other work can be slow; still bounded


def shoot(url: str, out: Path, max_new_tokens: int) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    with headless_chromium() as chromium:
        page = chromium.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(WAIT_MS)
        page.goto(url + "/playground")
        expect(page.locator("#server-info")).not_to_contain_text("Connecting")
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Adapter", exact=True).select_option("bullets")
        page.get_by_label("Max new tokens", exact=True).fill(str(max_new_tokens))
        page.get_by_label("Presence penalty (-2 to 2)").fill("0.5")  # the decoding bullets is judged with
        page.get_by_label("Search features by label or token").fill("list")
        page.get_by_role("button", name="Search", exact=True).click()
        hit = page.get_by_role("list", name="Search results").locator("li").first
        name = hit.get_by_role("button", name="Clamp feature").get_attribute("aria-label")
        index = name.rsplit(" ", 1)[1]
        hit.get_by_role("button", name=name).click()
        page.get_by_label(f"Operation for feature {index}").select_option("add")
        page.get_by_label(f"Value for feature {index}").fill("4")
        page.get_by_role("button", name="Run", exact=True).click()
        expect(page.locator("#run-status")).to_contain_text("Done", timeout=WAIT_MS)
        part = page.locator("#steered .tok.part")
        (part if part.count() else page.locator("#steered .tok").nth(2)).hover()
        page.screenshot(path=str(out / "playground-ab.png"))

        page.get_by_role("button", name=f"Remove feature {index}").click()
        page.get_by_label("Custom scale").fill("2")
        page.get_by_label("Seed", exact=True).fill("7")
        page.get_by_role("button", name="Run sweep").click()
        expect(page.locator("#sweep-status")).to_contain_text("Done", timeout=WAIT_MS)
        page.locator("section[aria-labelledby=sweep-h]").screenshot(path=str(out / "playground-sweep.png"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--url", help="a running server (default: start one on the default model)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    if browser_missing():
        print(f"cannot take screenshots: {browser_missing()}", file=sys.stderr)
        return 1
    if args.url:
        shoot(args.url.rstrip("/"), args.out, args.max_new_tokens)
        return 0
    server = ServerProcess(["--adapters-dir", str(REPO / "adapters"), "--device", "cpu"], cwd=REPO)
    try:
        server.wait_ready(timeout_s=900, max_polls=9000)
        shoot(server.url, args.out, args.max_new_tokens)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
