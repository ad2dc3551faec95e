"""`fsrl serve --engine vllm` against the default engine: the same contract requests, over real
HTTP, to two servers on the same tiny setup and settings (fp32, greedy) give the same answers;
adapters hot-swap into vLLM's bank without a request ever getting the wrong version.

The vLLM server is the session's shared one (tests/conftest.py: the route files' `vllm` cases
talk to it too, and its adapters are put back as found after each test); the default engine is
the app `fsrl serve` runs, under uvicorn in a thread of this process (tests/_server_fixtures.py).
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from fsrl.testing import TinySetup, read_sse, serving, tiny_server_args

from _server_fixtures import CAP, VLLM_MISSING, ServedClient, watch_points

pytestmark = [pytest.mark.slow, VLLM_MISSING]

# The tensor-parallel server's own limits (the shared server has the route files' settings).
LIMITS = ("--max-new-tokens-cap", "48", "--max-prompt-tokens", "320", "--max-batch-rows", "8",
          "--max-adapters", "3")
CLAMPS = [{"index": 3, "op": "set", "value": 60.0}, {"index": 10, "op": "add", "value": 40.0},
          {"index": 11, "op": "scale", "value": 3.0}, {"index": 12, "op": "ablate"}]
REQUESTS = {
    "unsteered": {"prompt": "hello there"},
    "adapter": {"prompt": "hello there", "adapter": "tiny"},
    "adapter at half scale": {"prompt": "hello there", "adapter": "tiny", "steering_scale": 0.5},
    "clamps of every op, no adapter": {"prompt": "hello there", "features": CLAMPS},
    "adapter with clamps and unsteer": {"prompt": "abc def", "adapter": "tiny",
                                        "features": [*CLAMPS[:2], {"index": 5, "op": "unsteer"}]},
    "from the first generated token": {"prompt": "abc def", "adapter": "tiny", "steer_positions": "generated"},
    "compare": {"prompt": "abc", "adapter": "tiny", "compare": True},
    "stop string": {"prompt": "hello there", "adapter": "tiny", "stop": ["cv"], "max_new_tokens": 30},
    "chat messages": {"messages": [{"role": "user", "content": "hi"}], "adapter": "tiny"},
    "ignore_eos, long": {"prompt": "x", "ignore_eos": True, "max_new_tokens": 40},
    "presence and frequency penalties": {"prompt": "x", "adapter": "tiny", "ignore_eos": True, "max_new_tokens": 40,
                                         "presence_penalty": 1.5, "frequency_penalty": 0.5},
}


def _answer(body: dict) -> tuple:
    steered, base = body["steered"], body["base"]
    return (steered["text"], steered["finish_reason"], steered["completion_tokens"],
            base and (base["text"], base["finish_reason"]))


@pytest.fixture(scope="module")
def setup(vllm_setup) -> TinySetup:
    return vllm_setup  # 128 wide: vLLM's CPU attention takes heads of 32


@pytest.fixture(scope="module")
def default(setup):
    """The default engine with the shared vLLM server's settings."""
    from server.app import create_app
    from server.settings import Settings

    with ServedClient(create_app(Settings(model=str(setup.model_dir), sae=setup.sae_dir,
                                          adapters_dir=setup.adapters_dir, device="cpu",
                                          max_new_tokens_cap=CAP))) as client:
        yield client


@pytest.fixture(scope="module")
def servers(default, vllm_server):
    """(default engine, vLLM engine): HTTP clients of two servers with the same settings."""
    with httpx.Client(base_url=vllm_server.url, timeout=120) as vllm:
        yield default, vllm


def test_health_names_the_engine(servers):
    default, vllm = servers
    assert default.get("/health").json()["engine"] == "transformers"
    assert vllm.get("/health").json()["engine"] == "vllm"


@pytest.mark.parametrize("name", list(REQUESTS))
def test_the_same_request_gives_the_same_answer_on_both_engines(servers, name):
    default, vllm = servers
    body = {"max_new_tokens": 16, **REQUESTS[name]}
    got = [client.post("/generate", json=body) for client in servers]
    assert [r.status_code for r in got] == [200, 200], [r.text for r in got]
    assert _answer(got[1].json()) == _answer(got[0].json())


def test_steering_changes_the_vllm_answer(servers):
    """Not a vacuous equality: the adapter and the clamps move the tokens on this setup."""
    _, vllm = servers
    texts = {name: vllm.post("/generate", json={"max_new_tokens": 16, **REQUESTS[name]}).json()["steered"]["text"]
             for name in ("unsteered", "adapter", "clamps of every op, no adapter")}
    assert len(set(texts.values())) == 3, texts
    penalised = REQUESTS["presence and frequency penalties"]
    plain = {k: v for k, v in penalised.items() if not k.endswith("_penalty")}
    assert (vllm.post("/generate", json=penalised).json()["steered"]["text"]
            != vllm.post("/generate", json=plain).json()["steered"]["text"])   # the penalties reach vLLM


def test_the_prefix_cache_never_serves_one_steering_s_kv_to_another(servers):
    """A prompt of two full KV blocks (vLLM's CPU blocks hold 128 tokens), sent unsteered,
    steered, steered otherwise, then unsteered again: with vLLM's prefix cache on, each must
    still equal the default engine's answer (a steered request reusing unsteered blocks, or
    the reverse, would not: without the cache salt this test fails)."""
    prompt = "The quick brown fox jumps over the lazy dog; " * 6
    bodies = [{"prompt": prompt}, {"prompt": prompt, "adapter": "tiny"},
              {"prompt": prompt, "adapter": "tiny", "steering_scale": 0.5},
              {"prompt": prompt, "features": CLAMPS}, {"prompt": prompt}]
    answers = [[_answer(c.post("/generate", json={**b, "max_new_tokens": 8}).json()) for b in bodies]
               for c in servers]
    assert answers[1] == answers[0]
    assert len({a[0] for a in answers[0][:4]}) == 4  # four steerings, four answers


def test_a_stream_carries_the_same_text(servers):
    _, vllm = servers
    body = {"prompt": "abc", "adapter": "tiny", "compare": True, "max_new_tokens": 12}
    whole = vllm.post("/generate", json=body).json()
    with vllm.stream("POST", "/generate", json={**body, "stream": True}) as response:
        events, ended = read_sse(response)
    assert ended
    streamed = {"steered": "", "base": ""}
    for event in events:
        if event.get("type") == "token":
            streamed[event["output"]] += event["text"]
    assert streamed == {"steered": whole["steered"]["text"], "base": whole["base"]["text"]}


def test_openai_routes_give_the_same_answers(servers):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 10, "temperature": 0}
    completion = {"model": "tiny", "prompt": [1, 40, 41, 42, 43], "max_tokens": 6, "temperature": 0,
                  "logprobs": 2, "echo": True}
    got = [(c.post("/v1/chat/completions", json=chat).json(), c.post("/v1/completions", json=completion).json())
           for c in servers]
    (chat_a, comp_a), (chat_b, comp_b) = got
    assert chat_b["choices"][0]["message"] == chat_a["choices"][0]["message"]
    assert comp_b["choices"][0]["text"] == comp_a["choices"][0]["text"]
    lp_a, lp_b = comp_a["choices"][0]["logprobs"], comp_b["choices"][0]["logprobs"]
    assert lp_b["tokens"] == lp_a["tokens"]
    for x, y in zip(lp_a["token_logprobs"], lp_b["token_logprobs"]):  # the prompt's first is None on both
        assert (x is None and y is None) or abs(x - y) < 1e-3
    for top_a, top_b in zip(lp_a["top_logprobs"], lp_b["top_logprobs"]):
        assert (top_a is None and top_b is None) or list(top_a) == list(top_b)


def test_returned_features_are_the_default_engine_s(servers):
    """`return_features`: the same features per token (indices, and deltas to fp32 rounding), read
    in-graph on vLLM; a stream carries them too; an unsteered row's lists are empty."""
    body = {"prompt": "abc def", "adapter": "tiny", "features": CLAMPS[:2], "return_features": 5,
            "compare": True, "max_new_tokens": 10}
    got = [c.post("/generate", json=body).json() for c in servers]
    a, b = got[0]["steered"]["features"], got[1]["steered"]["features"]
    assert len(a) == len(b) == 10 and any(a)
    for token_a, token_b in zip(a, b):
        assert [f["index"] for f in token_b] == [f["index"] for f in token_a]
        assert all(abs(x["delta"] - y["delta"]) <= 1e-3 * max(1.0, abs(x["delta"])) for x, y in zip(token_a, token_b))
    plain = servers[1].post("/generate", json={"prompt": "abc", "return_features": 3, "max_new_tokens": 4}).json()
    assert plain["steered"]["features"] == [[], [], [], []]
    with servers[1].stream("POST", "/generate", json={**body, "stream": True}) as response:
        events, ended = read_sse(response)
    streamed = [e["features"] for e in events if e.get("type") == "token" and e["output"] == "steered"]
    assert ended and [[f["index"] for f in t] for t in streamed] == [[f["index"] for f in t] for t in b]


@pytest.fixture(scope="module")
def watched(setup):
    return watch_points(setup, "hello there", 16)


def test_conditional_clamps_give_the_same_answer_on_both_engines_and_are_not_ignored(servers, watched):
    """A clamp with `when` on a feature active at about half the prompt's positions: the same
    tokens on both engines, and on vLLM (in its compiled graph) neither the unconditional
    clamp's answer nor the unsteered one (a condition dropped or always false would give one)."""
    clamp = {"index": 12, "op": "set", "value": 60.0}
    bodies = {"when": {"prompt": "hello there", "features": [{**clamp, "when": watched.when}]},
              "always": {"prompt": "hello there", "features": [clamp]},
              "never": {"prompt": "hello there", "features": [{**clamp, "when": {**watched.when, "above": 1e4}}]},
              "unsteered": {"prompt": "hello there"}}
    answers = [{name: _answer(c.post("/generate", json={**body, "max_new_tokens": 16}).json())
                for name, body in bodies.items()} for c in servers]
    assert answers[1] == answers[0]
    texts = {name: answer[0] for name, answer in answers[1].items()}
    assert texts["never"] == texts["unsteered"]
    assert len({texts["when"], texts["always"], texts["unsteered"]}) == 3, texts


def test_abort_when_stops_both_engines_at_the_same_token(servers, watched):
    """The condition first passes on the third generated token: both engines stop there, with
    finish_reason "feature" and the feature named; a stream ends with a token-less event; the
    OpenAI route finishes with "stop" and names the feature; the compare row stops too."""
    body = {"prompt": "hello there", "abort_when": [watched.abort], "max_new_tokens": 16, "ignore_eos": True,
            "compare": True}
    free = servers[0].post("/generate", json={"prompt": "hello there", "max_new_tokens": 16,
                                               "ignore_eos": True}).json()["steered"]
    for client in servers:
        got = client.post("/generate", json=body).json()
        for row in ("steered", "base"):
            out = got[row]
            assert (out["finish_reason"], out.get("fired_feature"), out["completion_tokens"]) ==                 ("feature", watched.abort["index"], watched.abort_at), (row, out)
            assert free["text"].startswith(out["text"]) and len(out["text"]) < len(free["text"])
        with client.stream("POST", "/generate", json={**body, "compare": False, "stream": True}) as response:
            events, ended = read_sse(response)
        tokens = [e for e in events if e.get("type") == "token"]
        assert ended and len(tokens) == watched.abort_at + 1
        assert tokens[-1]["token_id"] is None and tokens[-1]["finish_reason"] == "feature"
        assert tokens[-1]["fired_feature"] == watched.abort["index"]
        assert "".join(t["text"] for t in tokens) == got["steered"]["text"]
        completion = client.post("/v1/completions", json={
            "model": client.get("/v1/models").json()["data"][0]["id"],
            "prompt": "hello there", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "steering": {"abort_when": [watched.abort]}}).json()
        choice = completion["choices"][0]
        assert (choice["finish_reason"], choice["fired_feature"], choice["text"]) == \
            ("stop", watched.abort["index"], got["steered"]["text"])


def test_telemetry_is_the_default_engine_s_on_vllm_but_for_the_kl(servers, watched):
    """Read in vLLM's graph: the same norms (to float rounding), features pushed and conditions
    passed at every token as on the default engine; vLLM reports no KL."""
    body = {"prompt": "hello there", "adapter": "tiny", "telemetry": True, "compare": True,
            "features": [{"index": 12, "op": "set", "value": 60.0, "when": watched.when}],
            "max_new_tokens": 8, "ignore_eos": True}
    default, vllm = [c.post("/generate", json=body).json()["steered"]["telemetry"] for c in servers]
    assert len(default) == len(vllm) == 8
    for a, b in zip(default, vllm):
        assert abs(a["norm"] - b["norm"]) <= 1e-3 * max(1.0, a["norm"]), (a, b)
        assert (a["pushed"], a["conditions"]) == (b["pushed"], b["conditions"])
        assert a["kl"] is not None and b["kl"] is None
    assert any(t["conditions"] for t in default) and len({t["norm"] for t in default}) > 1


def test_a_constant_adapter_built_over_http_gives_the_same_answer_on_both_engines(servers, setup):
    """Built by POST /adapters (written once into the shared adapters directory, replaced by the
    second server's build), hot-loaded into vLLM's bank: the same tokens as the default engine,
    not the unsteered ones."""
    build = {"id": "const", "constant": {"features": [{"index": 4, "value": 30.0}, {"index": 9, "value": -20.0}]}}
    body = {"prompt": "hello there", "adapter": "const", "max_new_tokens": 16, "compare": True}
    try:
        answers = []
        for i, client in enumerate(servers):
            r = client.post("/adapters", json={**build, "replace": i > 0})
            assert r.status_code == 201, r.text
            answers.append(_answer(client.post("/generate", json=body).json()))
    finally:
        for client in servers:
            client.delete("/adapters/const")
        shutil.rmtree(setup.adapters_dir / "const", ignore_errors=True)
    assert answers[1] == answers[0] and answers[0][0] != answers[0][3][0]


def test_hot_swap_under_load_never_serves_the_wrong_version(servers, setup):
    """Requests run back to back while `tiny` is replaced by other weights: every answer is the
    old version's or the new one's, and every request sent after the replace returned gets
    the new one's. Expected texts come from the default engine."""
    default, vllm = servers
    body = {"prompt": "hello there", "adapter": "tiny", "max_new_tokens": 16}
    old = default.post("/generate", json=body).json()["steered"]["text"]
    default.post("/adapters", json={"id": "tiny-v2", "path": "more/tiny-b"}).raise_for_status()
    new = default.post("/generate", json={**body, "adapter": "tiny-v2"}).json()["steered"]["text"]
    assert old != new
    answers: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 120
        for _ in range(200):
            if stop.is_set() or time.monotonic() > deadline:
                return
            sent = time.monotonic()
            answers.append((sent, vllm.post("/generate", json=body).json()["steered"]["text"]))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.0)
        replaced = vllm.post("/adapters", json={"id": "tiny", "path": "more/tiny-b", "replace": True})
        swapped_at = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=150)
    assert replaced.status_code == 201, replaced.text
    assert answers and {text for _, text in answers} <= {old, new}
    assert all(text == new for sent, text in answers if sent > swapped_at)
    assert any(text == old for _, text in answers) and any(text == new for _, text in answers)
    # back to the first weights, for the other tests
    vllm.post("/adapters", json={"id": "tiny", "path": "tiny", "replace": True}).raise_for_status()
    assert vllm.post("/generate", json=body).json()["steered"]["text"] == old


def test_adapters_beyond_the_bank_s_slots_are_paged_in_and_each_answer_is_its_own(servers, setup):
    """Four adapters on the shared server's two bank slots (the shipped one and three constant
    ones built over HTTP), asked for by eight concurrent clients in turn: every answer is what
    the default engine (every adapter resident) gives for that adapter, none fails, and two of
    them sit in the bank after, two in host memory."""
    from concurrent.futures import ThreadPoolExecutor

    default, vllm = servers
    ids = ["tiny"] + [f"page{k}" for k in range(3)]
    body = {"prompt": "hello there", "max_new_tokens": 12, "ignore_eos": True}
    try:
        for k, adapter_id in enumerate(ids[1:]):
            build = {"id": adapter_id, "constant": {"features": [{"index": 4 + 3 * k, "value": 30.0 + 10 * k}]}}
            for i, client in enumerate(servers):
                r = client.post("/adapters", json={**build, "replace": i > 0})
                assert r.status_code == 201, r.text
        want = {a: default.post("/generate", json={**body, "adapter": a}).json()["steered"]["text"] for a in ids}
        assert len(set(want.values())) == 4  # four different steerings
        order = ids * 4
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda a: vllm.post("/generate", json={**body, "adapter": a}), order))
        assert [r.status_code for r in answers] == [200] * len(order)
        assert [r.json()["steered"]["text"] for r in answers] == [want[a] for a in order]
        status = [a["status"] for a in vllm.get("/adapters").json()["adapters"] if a["id"] in ids]
        assert status.count("loaded") == 2 and status.count("offloaded") == 2
    finally:
        for adapter_id in ids[1:]:
            for client in servers:
                client.delete(f"/adapters/{adapter_id}")
            shutil.rmtree(setup.adapters_dir / adapter_id, ignore_errors=True)


def test_replaced_and_unloaded_versions_give_their_bank_slots_back(servers):
    """Ten replaces and load/unload cycles in a row on the shared server's two bank slots: each
    retired version leaves its slot and the workers' host memory when its last request ends,
    and the next version pages in."""
    _, vllm = servers
    body = {"prompt": "abc", "adapter": "swap", "max_new_tokens": 4}
    for i in range(10):
        path = "tiny" if i % 2 else "more/tiny-b"
        assert vllm.post("/adapters", json={"id": "swap", "path": path, "replace": True}).status_code == 201
        assert vllm.post("/generate", json=body).status_code == 200
    assert vllm.delete("/adapters/swap").status_code == 200
    missing = vllm.post("/generate", json=body)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_two_tensor_parallel_ranks_answer_like_the_default_engine(default, setup, tmp_path):
    """`--tensor-parallel-size 2` (the tiny model's 4 heads and 2 KV heads split in two; one CPU
    core per rank): the steering runs on both ranks, the answers are the default engine's."""
    names = ("unsteered", "adapter", "clamps of every op, no adapter", "compare")
    # Eager: tests/test_vllm_plugin.py checks the compiled graph on two ranks token for token.
    with serving(tiny_server_args(setup, *LIMITS, "--engine", "vllm", "--tensor-parallel-size", "2", "--enforce-eager"),
                 tmp_path / "tp2.log", timeout_s=600, max_polls=6000,
                 env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as tp2, httpx.Client(base_url=tp2.url, timeout=120) as ranks:
        for name in names:
            body = {"max_new_tokens": 16, **REQUESTS[name]}
            assert _answer(ranks.post("/generate", json=body).json()) == _answer(
                default.post("/generate", json=body).json()), name
