"""The tiny server as a real `fsrl serve` process, over real HTTP: what needs the process, its
flags or real connections (packed and plain weights, clients that hang up,
concurrent clients sharing forward passes); and the real default model and shipped SAE.

Every test here starts a subprocess server: the whole file is slow.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fsrl.testing import serving, tiny_server_args

import _server_fixtures as fixtures
from _server_fixtures import CAP, generate

# Fixtures the server's test files share: pytest finds them by these names.
setup, server = fixtures.setup, fixtures.server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


def test_server_without_packed_weights_answers_as_the_packed_one(client, setup, tmp_path):
    with serving(tiny_server_args(setup, "--no-pack-cpu-weights"), tmp_path / "server.log") as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as plain:
        assert plain.get("/health").json()["packed_cpu_weights"] is False
        for body in ({"prompt": "hello there"}, {"prompt": "the cat", "adapter": "tiny", "compare": True},
                     {"prompt": "abc", "features": [{"index": 3, "op": "set", "value": 9.0}]}):
            body = {**body, "max_new_tokens": 12, "ignore_eos": True}
            plain_answer, packed_answer = generate(plain, **body), generate(client, **body)
            for key in ("steered", "base", "usage"):
                assert plain_answer[key] == packed_answer[key], key


# --- clients that hang up -------------------------------------------------------------------------

LONG = {"prompt": "hi", "max_new_tokens": CAP, "ignore_eos": True}  # seconds of work


def _long_job_ms(client) -> float:
    full = generate(client, **LONG)["timing"]["total_ms"]
    assert full > 300, "the long request must take long enough for the disconnect tests to mean anything"
    return full


def metric(client, name: str) -> float:
    line = next(l for l in client.get("/metrics").text.splitlines() if l.startswith(name + " "))
    return float(line.split()[-1])


def _ms_until_rows(client, rows: int, limit_s: float, why: str) -> float:
    """Milliseconds until the running batch holds `rows` rows; fails with `why` after `limit_s`."""
    start = time.perf_counter()
    while metric(client, "fsrl_batch_rows") != rows:
        assert time.perf_counter() - start < limit_s, why
        time.sleep(0.02)
    return (time.perf_counter() - start) * 1000.0


def _ms_until_the_batch_is_empty(client) -> float:
    return _ms_until_rows(client, 0, limit_s=60.0, why="rows still running")


def test_client_that_disconnects_frees_its_row(client, server):
    full_ms = _long_job_ms(client)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/generate", json=LONG, timeout=0.1)
    assert _ms_until_the_batch_is_empty(client) < full_ms / 2  # the abandoned job did not run to its end


def test_stream_client_that_disconnects_frees_its_row(client, server):
    full_ms = _long_job_ms(client)
    with httpx.stream("POST", f"{server.url}/generate", json={**LONG, "stream": True}, timeout=10) as r:
        # Hold the iterator: a dropped one is closed at once, and closing it closes the connection.
        lines = r.iter_lines()
        next(lines)  # one event...
        _ms_until_rows(client, 1, limit_s=5.0, why="the streamed job's row is not running")
    # ...then hang up, leaving the `with`.
    assert _ms_until_the_batch_is_empty(client) < full_ms / 2


# --- concurrent clients ---------------------------------------------------------------------------

# The property of continuous batching: rows sharing forward passes change nothing.
MIX = [
    {"prompt": "alpha beta", "adapter": "tiny", "max_new_tokens": 14},
    {"prompt": "a much longer prompt than any other here", "max_new_tokens": 6, "compare": True,
     "adapter": "tiny", "steering_scale": 2.0},
    {"prompt": "seeded", "temperature": 1.0, "seed": 7, "top_k": 20, "max_new_tokens": 10,
     "features": [{"index": 3, "op": "set", "value": 5.0}]},
    {"prompt": "nucleus", "temperature": 0.8, "top_p": 0.9, "seed": 3, "max_new_tokens": 18,
     "adapter": "tiny", "steer_positions": "generated", "return_features": 2},
    {"prompt": "hi", "max_new_tokens": 1},
    {"prompt": "stop here", "max_new_tokens": 12, "stop": ["e"], "compare": True, "adapter": "tiny"},
]


def _outputs(answer: dict) -> tuple:
    """Texts and feature indices exactly; deltas to float32 noise (batch shapes change the
    order of sums)."""
    features = answer["steered"].get("features") or []
    return (answer["steered"]["text"], (answer["base"] or {}).get("text"),
            [[f["index"] for f in step] for step in features],
            [f["delta"] for step in features for f in step])


def test_concurrent_requests_answer_as_each_would_alone_and_share_forward_passes(client, server):
    alone = [_outputs(generate(client, ignore_eos=True, **body)) for body in MIX]
    shared_before = metric(client, "fsrl_batch_size_count") - metric(client, 'fsrl_batch_size_bucket{le="2.0"}')

    def send(body: dict) -> tuple:
        with httpx.Client(base_url=server.url, timeout=60.0) as c:
            return _outputs(generate(c, ignore_eos=True, **body))
    with ThreadPoolExecutor(len(MIX) * 2) as pool:
        together = list(pool.map(send, MIX * 2))
    for got, want in zip(together, alone * 2):
        assert got[:3] == want[:3] and got[3] == pytest.approx(want[3], rel=1e-4)
    # Alone, no forward pass has more than 2 rows (a compare); together, some did.
    shared_after = metric(client, "fsrl_batch_size_count") - metric(client, 'fsrl_batch_size_bucket{le="2.0"}')
    assert shared_after > shared_before


# --- the real default model -----------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_and_sae_answer_a_steered_compare_request(default_server):
    health = httpx.get(f"{default_server.url}/health", timeout=10).json()
    assert health["model"] == "SmolLM2-135M-Instruct"
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "features": [{"index": 0, "op": "set", "value": 10.0}], "compare": True,
            "max_new_tokens": 16, "return_features": 3}
    r = httpx.post(f"{default_server.url}/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    for output in ("steered", "base"):
        text = out[output]["text"]
        assert sum(ch.isalpha() for ch in text) >= 5, (output, text)
    assert "Paris" in out["base"]["text"]
    returned = [f for step in out["steered"]["features"] for f in step]
    assert any(f["index"] == 0 for f in returned)
    # The shipped labels: nearly every feature a request reports has one, with its source.
    assert sum(f["label"] is not None for f in returned) >= 0.9 * len(returned)
    found = httpx.get(f"{default_server.url}/features", params={"q": "list", "limit": 3}, timeout=30).json()["features"]
    assert found and all("list" in f["label"] for f in found)
    # The shipped adapters load; `concise` answers in a complete, clearly shorter text.
    assert health["adapters"] == 2
    r = httpx.post(f"{default_server.url}/generate", timeout=300, json={
        "messages": [{"role": "user", "content": "Tell me about volcanoes."}],
        "adapter": "concise", "compare": True, "max_new_tokens": 96})
    out = r.json()
    assert out["steered"]["finish_reason"] == "stop" and out["base"]["finish_reason"] == "length"
    # "Clearly shorter" as the demo's evaluation rule reads it: at most 3/4 of the base's length.
    assert out["steered"]["completion_tokens"] <= 0.75 * out["base"]["completion_tokens"]
    features = httpx.get(f"{default_server.url}/adapters/concise/features", params={"top": 5}, timeout=60).json()
    assert len(features["features"]) == 5 and features["measured_on_tokens"] > 1000
    # Both ship their audit, made on the weights they ship.
    for adapter_id in ("concise", "bullets"):
        card = httpx.get(f"{default_server.url}/adapters/{adapter_id}/card", timeout=30).json()
        assert card["weights_match"] is True and card["summary"]["pairs"] > 0, card
