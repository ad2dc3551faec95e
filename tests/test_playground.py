"""The browser playground (GET /playground): the page and its files over plain HTTP, open
without the API key while the API still needs it; then end to end in headless Chromium
against a real `fsrl serve` on the tiny setup with dashboards built: an adapter and its card,
a searched clamp and its dashboard, an A/B run streamed side by side, a token's features on
hover, a sweep, "copy as curl" and "copy as Python" replayed to the same answer, and errors
shown to the user (an unknown feature, a missing or wrong key, a full queue)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from fsrl.sae import read_labels
from fsrl.testing import (TinySetup, browser_missing, build_tiny_dashboards, headless_chromium, serving, tiny_server_args,
                             write_tiny_setup)

WAIT_MS = 60_000  # the longest any step may take: a run on two shared CPU cores, with margin


# --- plain HTTP ---------------------------------------------------------------------------------

class _Controls(HTMLParser):
    """The page's form controls, labels, named regions and asset links."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict] = []          # attrs of input/select/textarea, plus "wrapped"
        self.labels: dict[str, str] = {}        # for= id -> label text
        self.headings: dict[str, str] = {}      # id -> heading text
        self.regions: list[str] = []            # aria-labelledby of sections
        self.buttons: list[str] = []
        self.links: list[str] = []              # src and href values
        self._open: list[tuple[str, dict]] = []  # label/button/h* elements being read
        self._text: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag in ("input", "select", "textarea"):
            self.controls.append({**a, "tag": tag, "wrapped": any(t == "label" for t, _ in self._open)})
        if tag == "section" and "aria-labelledby" in a:
            self.regions.append(a["aria-labelledby"])
        if tag in ("label", "button", "h2", "h3"):
            self._open.append((tag, a))
            self._text.append([])

    def handle_data(self, data: str) -> None:
        for text in self._text:
            text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, a = self._open.pop()
            text = " ".join("".join(self._text.pop()).split())
            if tag == "label" and "for" in a:
                self.labels[a["for"]] = text
            elif tag == "button":
                self.buttons.append(text)
            elif "id" in a:
                self.headings[a["id"]] = text


def test_the_page_and_its_files_load_without_a_key_and_the_api_still_needs_one(tmp_path):
    from _server_fixtures import ServedClient
    from server.app import create_app
    from server.settings import Settings

    setup = write_tiny_setup(tmp_path / "tiny")
    app = create_app(Settings(model=str(setup.model_dir), sae=setup.sae_dir, adapters_dir=setup.adapters_dir,
                              device="cpu", api_key="sesame"))
    with ServedClient(app) as c:
        root = c.get("/", follow_redirects=False)
        assert root.status_code in (302, 307) and root.headers["location"] == "/playground"
        page = c.get("/playground")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            asset = c.get(f"/playground/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        # Everything else still needs the key: the API, and paths the page does not serve.
        body = {"prompt": "hi", "max_new_tokens": 2}
        assert c.post("/generate", json=body).status_code == 401
        assert c.get("/adapters").status_code == 401
        assert c.get("/playground/secrets.txt").status_code == 401
        key = {"Authorization": "Bearer sesame"}
        assert c.post("/generate", json=body, headers=key).status_code == 200
        assert c.get("/playground/secrets.txt", headers=key).status_code == 404

    html = _Controls()
    html.feed(page.text)
    by_label = {text: html_id for html_id, text in html.labels.items()}
    controls = {c.get("id"): c for c in html.controls}
    assert controls[by_label["Prompt"]]["tag"] == "textarea"
    assert controls[by_label["Steering scale"]]["type"] == "range"
    assert "Run" in html.buttons
    assert {html.headings[r] for r in html.regions} >= {"Steered", "Base"}
    # Every control says what it is: a label for it, a label around it, or an aria-label.
    unnamed = [c for c in html.controls if not (c.get("id") in html.labels or c["wrapped"] or c.get("aria-label"))]
    assert not unnamed, unnamed
    # No CDN: every script, style and link is this server's own.
    assert html.links and all(link.startswith("/playground") or link == "data:," for link in html.links), html.links


# --- in the browser -----------------------------------------------------------------------------

# The browser tests are also marked slow: each starts, or shares, a real server subprocess.
needs_browser = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[TinySetup, Path]:
    root = tmp_path_factory.mktemp("playground")
    setup = write_tiny_setup(root / "tiny")
    build_tiny_dashboards(setup, root)
    return setup, root


@pytest.fixture(scope="module")
def server(tiny) -> Iterator:
    setup, root = tiny
    with serving(tiny_server_args(setup), root / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    if browser_missing():
        pytest.skip(browser_missing())
    with headless_chromium() as b:
        yield b


def open_page(chromium, url: str):
    """A fresh tab (its own session storage and clipboard) on the playground, reached through
    `/`, once it has asked the server who it is."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)  # every expect below is bounded by this, not 5 s
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # scripts that threw: every test asserts there were none
    page.goto(url + "/")
    expect(page).to_have_url(url + "/playground")
    expect(page.locator("#server-info")).not_to_contain_text("Connecting", timeout=WAIT_MS)
    return page


@pytest.fixture
def page(chromium, server) -> Iterator:
    page = open_page(chromium, server.url)
    yield page
    page.context.close()
    assert not page.errors, page.errors


def run_and_wait(page, button: str, status: str) -> str:
    """Click `button`; wait (bounded) until `status` says the run ended; its text."""
    from playwright.sync_api import expect

    page.get_by_role("button", name=button, exact=True).click()
    expect(page.locator(status)).to_contain_text(re.compile(r"^(Done|Failed|Stopped)"), timeout=WAIT_MS)
    return page.locator(status).text_content()


def text_of(page, selector: str) -> str:
    return page.locator(selector).text_content()


@pytest.mark.slow
@needs_browser
def test_ab_run_with_a_searched_clamp_streams_both_rows_and_reproduces_as_curl_and_python(page, server, tiny):
    from playwright.sync_api import expect

    setup, _ = tiny
    labels = read_labels(setup.sae_dir)
    # The names a screen reader gives the controls the issue lists; and no control without one.
    for role, name in (("textbox", "Prompt"), ("button", "Run"), ("region", "Steered"), ("region", "Base"),
                       ("slider", "Steering scale"), ("combobox", "Adapter")):
        expect(page.get_by_role(role, name=name, exact=True)).to_have_count(1)
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || e.textContent.trim()))
        .map(e => e.outerHTML)""")
    assert not unnamed, unnamed

    # The adapter, and its card: top features with labels and classes; no analysis report yet.
    page.get_by_label("Adapter", exact=True).select_option("tiny")
    card = page.get_by_role("table", name="Top features")
    expect(card.locator("tbody tr")).to_have_count(20)
    first = card.locator("tbody tr").first
    expect(first.locator("td").nth(2)).to_have_text(re.compile(r"^(alignment|style|other|–)$"))
    index = int(first.locator("td").first.text_content().lstrip("#"))
    assert first.locator("td").nth(1).text_content() == labels.get(index, ("(unlabelled)",))[0]
    expect(page.locator("#card-analysis")).to_contain_text("No analysis yet")

    # Search by a token a live feature's label names, clamp the best hit, open its dashboard.
    token = next(label.split('"')[1] for label, _ in labels.values() if label.count('"') >= 2)
    page.get_by_label("Search features by label or token").fill(token)
    page.get_by_role("button", name="Search", exact=True).click()
    hits = page.get_by_role("list", name="Search results").locator("li")
    expect(hits.first.get_by_role("button", name=re.compile(r"^Clamp feature \d+$"))).to_be_visible()
    clamp_name = hits.first.get_by_role("button", name=re.compile(r"^Clamp feature")).get_attribute("aria-label")
    clamped = int(clamp_name.rsplit(" ", 1)[1])
    assert labels[clamped][0] == hits.first.locator(".label").text_content()
    hits.first.get_by_role("button", name=clamp_name).click()
    page.get_by_label(f"Operation for feature {clamped}").select_option("add")
    page.get_by_label(f"Value for feature {clamped}").fill("40")
    page.get_by_role("table", name="Clamps").get_by_role("button", name=f"Dashboard for feature {clamped}").click()
    dashboard = page.get_by_role("region", name="Feature dashboard")
    expect(dashboard.get_by_role("heading", level=3)).to_have_text(f"Feature {clamped}: {labels[clamped][0]}")
    expect(dashboard.locator(".contexts li mark").first).to_be_visible()  # the peak token, marked
    expect(dashboard.get_by_role("list", name="Promoted tokens").locator("li").first).to_be_visible()

    # A/B: both rows stream side by side, and they part somewhere (the clamp and the adapter push).
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Presence penalty (-2 to 2)").fill("0.5")
    page.get_by_label("Max new tokens", exact=True).fill("24")
    page.get_by_label("Ignore end-of-sequence").check()
    status = run_and_wait(page, "Run", "#run-status")
    assert status.startswith("Done"), (status, text_of(page, "#alert"))
    expect(page.locator("#steered .tok")).to_have_count(24)  # one span per streamed token event
    expect(page.locator("#base .tok")).to_have_count(24)
    steered, base = text_of(page, "#steered .tokens"), text_of(page, "#base .tokens")
    assert steered != base and "They part at token" in status
    # The steering's telemetry, plotted under the A/B view: a norm and a KL line over 24 tokens.
    plot = page.get_by_role("img", name="Steering telemetry per token")
    expect(plot).to_be_visible()
    expect(plot.locator("polyline")).to_have_count(2)
    assert len(plot.locator("polyline.norm").get_attribute("points").split()) == 24
    expect(page.locator("#telemetry-summary")).to_contain_text(re.compile(r"^24 tokens: norm up to [0-9.]+"))
    expect(page.locator("#steered .tok.part")).to_have_count(1)
    expect(page.locator("#base .tok.part")).to_have_count(1)

    # Hovering a steered token shows its top steered features, labelled, with their deltas.
    page.locator("#steered .tok").nth(3).hover()
    rows = page.locator("#token-features tbody tr")
    expect(rows.first).to_be_visible()
    assert 1 <= rows.count() <= 5
    for r in range(rows.count()):
        cells = rows.nth(r).locator("td")
        i = int(cells.nth(0).text_content().lstrip("#"))
        assert cells.nth(1).text_content() == labels.get(i, ("(unlabelled)",))[0]
        float(cells.nth(2).text_content())

    # Copy as curl, run that command: the same two answers (greedy, seeded).
    page.get_by_role("button", name="Copy as curl").click()
    expect(page.locator("#copy-status")).to_contain_text("Copied")
    snippet = page.get_by_label("Snippet").input_value()
    assert page.evaluate("() => navigator.clipboard.readText()") == snippet
    assert snippet.startswith(f"curl -sS '{server.url}/generate'")
    done = subprocess.run(["bash", "-c", snippet], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["steered"]["text"], answer["base"]["text"]) == (steered, base)
    assert '"presence_penalty":0.5' in snippet and "frequency_penalty" not in snippet  # only what was set

    # Copy as Python: the OpenAI client on /v1, fsrl's extras in extra_body; the steered answer.
    page.get_by_role("button", name="Copy as Python (openai client)").click()
    snippet = page.get_by_label("Snippet").input_value()
    assert "extra_body=" in snippet and 'model="tiny"' in snippet and "presence_penalty=0.5" in snippet
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode() == steered + "\n"


@pytest.mark.slow
@needs_browser
def test_a_conditional_clamp_and_a_stop_condition_reach_the_server_and_the_stop_is_shown(page, server):
    """"Only where" on a clamp and "Stop when" go into the request (the curl snippet replays
    them to the same answers); a condition that passes everywhere stops both rows at their first
    generated token, and the status says which feature stopped them."""
    from playwright.sync_api import expect

    page.get_by_label("Feature index").fill("5")
    page.get_by_role("button", name="Add clamp", exact=True).click()
    page.get_by_label("Condition for feature 5").select_option("above")
    page.get_by_label("Condition feature for feature 5").fill("3")
    page.get_by_label("Condition threshold for feature 5").fill("0.5")
    page.get_by_label("Stop when feature").fill("0")
    page.get_by_label("Comparison").select_option("below")
    page.get_by_label("Threshold", exact=True).fill("10000")
    page.get_by_role("button", name="Add stop condition").click()
    expect(page.get_by_role("list", name="Stop conditions").locator("li")).to_have_count(1)
    page.get_by_label("Max new tokens", exact=True).fill("12")
    page.get_by_label("Ignore end-of-sequence").check()
    status = run_and_wait(page, "Run", "#run-status")
    assert "steered 1 tokens (stopped: feature 0 fired), base 1 tokens (stopped: feature 0 fired)" in status, status
    expect(page.locator("#steered .tok.stopped")).to_have_count(1)
    page.get_by_role("button", name="Copy as curl").click()
    snippet = page.get_by_label("Snippet").input_value()
    body = json.loads(snippet.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body["features"][0]["when"] == {"index": 3, "above": 0.5}
    assert body["abort_when"] == [{"index": 0, "below": 10000}]
    done = subprocess.run(["bash", "-c", snippet], capture_output=True, timeout=120)
    answer = json.loads(done.stdout)
    assert answer["steered"]["finish_reason"] == "feature" and answer["steered"]["fired_feature"] == 0
    assert answer["steered"]["text"] == text_of(page, "#steered .tokens")


@pytest.mark.slow
@needs_browser
def test_a_sweep_runs_every_scale_on_one_seed(page, server):
    from playwright.sync_api import expect

    page.get_by_label("Adapter", exact=True).select_option("tiny")
    page.get_by_label("Max new tokens", exact=True).fill("16")
    page.get_by_label("Ignore end-of-sequence").check()
    page.get_by_label("Custom scale").fill("3")
    page.get_by_label("Prompt", exact=True).fill("Hello there")
    status = run_and_wait(page, "Run sweep", "#sweep-status")
    assert status.startswith("Done: 5 of 5"), (status, text_of(page, "#alert"))
    seed = int(re.search(r"seed (\d+)", status).group(1))
    texts = {}
    for scale in ("0", "0.25", "0.5", "1", "3"):
        column = page.get_by_role("region", name=f"Scale {scale}", exact=True)
        expect(column.locator(".tok")).to_have_count(16)
        texts[scale] = column.locator(".tokens").text_content()
    assert len(set(texts.values())) >= 2  # the scale changes the answer
    # Each column is what /generate gives at its scale with the shared seed.
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for scale in ("0", "3"):
            direct = c.post("/generate", json={
                "messages": [{"role": "user", "content": "Hello there"}], "adapter": "tiny",
                "steering_scale": float(scale), "max_new_tokens": 16, "ignore_eos": True, "seed": seed,
                "temperature": 0, "top_p": 1, "steer_positions": "all"}).json()
            assert direct["steered"]["text"] == texts[scale], scale


@pytest.mark.slow
@needs_browser
def test_an_unknown_feature_index_is_shown_to_the_user(page):
    from playwright.sync_api import expect

    alert = page.get_by_role("alert")
    page.get_by_label("Feature index", exact=True).fill("99999")
    page.get_by_role("button", name="Add clamp", exact=True).click()
    expect(alert).to_contain_text("404 not_found: feature 99999 is out of range [0, 256)")
    page.get_by_role("button", name="Dismiss error").click()
    expect(alert).to_be_hidden()
    page.get_by_label("Max new tokens", exact=True).fill("4")
    assert run_and_wait(page, "Run", "#run-status") == "Failed."
    expect(alert).to_contain_text("422 invalid_value: features: index 99999 is out of range [0, 256)")


@pytest.mark.slow
@needs_browser
def test_the_adapter_card_shows_an_analysis_summary_when_the_server_has_one(page):
    from playwright.sync_api import expect

    # The shape `fsrl analyze` reports take: free-form keys, scalars, objects, lists of rows.
    summary = {"adapter": "tiny", "report": "analysis/report.json", "weights_match": False,
               "summary": {"pairs": 12, "eval_loss": 0.25,
                           "usage_relative_change_prompt_chosen": {"style": 0.6, "other": -0.4},
                           "top_features": [{"index": 3, "label": "list", "class": "style"}]}}
    page.route("**/adapters/tiny/card", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(summary)))
    page.get_by_label("Adapter", exact=True).select_option("tiny")
    analysis = page.locator("#card-analysis")
    expect(analysis.locator("dt").first).to_have_text("pairs")
    expect(analysis).to_contain_text("0.250")
    expect(analysis.locator("dd dl dt").first).to_have_text("style")
    expect(analysis.locator("table td").first).to_have_text("3")
    expect(analysis).to_contain_text("made on other weights")


@pytest.mark.slow
@needs_browser
def test_a_missing_or_wrong_key_and_a_full_queue_are_shown_to_the_user(chromium, tiny):
    """A server with FSRL_API_KEY and a queue of one: the page loads without the key, says the
    key is needed, takes it, and says so when the queue is full."""
    from playwright.sync_api import expect

    setup, root = tiny
    with serving(tiny_server_args(setup, "--max-queue", "1"), root / "server-key.log",
                 env={"FSRL_API_KEY": "sesame"}) as proc:
        page = open_page(chromium, proc.url)
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("401 invalid_api_key")
        key = page.get_by_label("API key")
        expect(key).to_be_visible()
        page.get_by_role("button", name="Dismiss error").click()
        key.fill("wrong")
        key.press("Enter")
        expect(alert).to_contain_text("401 invalid_api_key")
        key.fill("sesame")
        key.press("Enter")
        expect(page.get_by_label("Adapter", exact=True).locator("option")).to_have_count(2)
        expect(alert).to_be_hidden()
        assert page.evaluate("() => sessionStorage.getItem('fsrl-api-key')") == "sesame"

        # Keep the one queue slot busy from another client, then run: a 503 the user sees.
        stop = threading.Event()

        def hog() -> None:
            with httpx.Client(base_url=proc.url, timeout=120, headers={"Authorization": "Bearer sesame"}) as c:
                while not stop.is_set():
                    c.post("/generate", json={"prompt": "busy", "max_new_tokens": 200, "ignore_eos": True})
        busy = threading.Thread(target=hog, daemon=True)
        busy.start()
        try:
            page.get_by_label("Max new tokens", exact=True).fill("4")
            for _ in range(20):  # the hog's next request may not have arrived yet: a few tries
                if run_and_wait(page, "Run", "#run-status") == "Failed.":
                    break
            expect(alert).to_contain_text("503 overloaded")
            expect(alert).to_contain_text("The server is busy: retry in 1 s.")
        finally:
            stop.set()
            busy.join(timeout=120)
        page.context.close()
        assert not page.errors, page.errors
