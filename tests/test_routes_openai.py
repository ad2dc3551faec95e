"""The OpenAI-compatible surface (/v1) of the tiny server (uvicorn in a test thread, and again on `fsrl serve --engine vllm`): models,
chat and text completions with the steering extras, streams, log-probabilities (checked against the model's
own), echo and n, the official openai client; and lm-evaluation-harness running a
multiple-choice task through /v1/completions of a real `fsrl serve` (slow: a subprocess)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fsrl.testing import read_sse

import _server_fixtures as fixtures
from _server_fixtures import assert_error

# Fixtures the server's test files share: pytest finds them by these names.
# Both engines (`engine`); tests that need the default engine's process take `default_engine`.
engine, default_engine = fixtures.engine, fixtures.default_engine
setup, app_factory, client = fixtures.engine_setup, fixtures.app_factory, fixtures.engine_client
openai_client, server = fixtures.openai_client, fixtures.default_engine_server  # lm-eval's real `fsrl serve`


@pytest.fixture(scope="module")
def model(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(setup.model_dir))


def own_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from the plain model (no server, no steering)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = logits.log_softmax(-1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


# --- over HTTP ------------------------------------------------------------------------------------

def test_openai_models_lists_the_base_model_and_adapters(client, setup):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == setup.model_dir.name and "tiny" in ids


def test_openai_chat_completion_with_an_adapter_and_steering_extras(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "steering": {"scale": 2.0, "features": [{"index": 3, "op": "ablate"}]}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def test_openai_stream_sends_chunks_that_add_up_to_the_completion_then_done(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks, done = read_sse(r)
    assert done and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"


def test_openai_unknown_model_is_404_in_the_openai_error_shape(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert assert_error(r, 404, "gpt-4")["param"] == "model"


def test_completions_echo_returns_the_prompt_tokens_with_the_models_own_logprobs(client, setup, model):
    ids = [40, 41, 42, 43, 44, 45, 46]
    r = client.post("/v1/completions", json={"model": setup.model_dir.name, "prompt": [ids],
                                             "max_tokens": 1, "logprobs": 2, "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = own_logprobs(model[0], ids)
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
    tokenizer = model[1]
    assert choice["text"] == tokenizer.decode(ids) + lp["tokens"][-1]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    # Greedy: the generated token is the top one, its log-probability the top's exactly.
    top = lp["top_logprobs"][-1]
    assert len(top) == 2 and lp["token_logprobs"][-1] == max(top.values())
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}


def test_null_parameters_mean_their_defaults(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "n": None, "temperature": None, "logprobs": None, "top_logprobs": None, "stop": None,
            "tools": None, "stream": None, "seed": None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_give_each_tokens_logprob_and_its_top(client):
    r = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
        "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 3})
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] <= 0 and all(math.isfinite(t["logprob"]) for t in entry["top_logprobs"])


def test_n_choices_are_the_requests_with_seeds_seed_plus_j(client):
    body = {"model": "tiny", "prompt": "once upon", "max_tokens": 8, "ignore_eos": True,
            "temperature": 1.0, "seed": 40}
    together = client.post("/v1/completions", json={**body, "n": 3}).json()
    texts = [c["text"] for c in sorted(together["choices"], key=lambda c: c["index"])]
    alone = [client.post("/v1/completions", json={**body, "seed": 40 + j}).json()["choices"][0]["text"]
             for j in range(3)]
    assert texts == alone and len(set(texts)) > 1
    assert together["usage"]["completion_tokens"] == 24 and together["usage"]["prompt_tokens"] == len("once upon")


def test_several_prompts_get_one_choice_each_in_order(client):
    prompts = ["abc", "hello there", "xyz"]
    body = {"model": "tiny", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    together = client.post("/v1/completions", json={**body, "prompt": prompts}).json()["choices"]
    alone = [client.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    assert [c["index"] for c in together] == [0, 1, 2] and [c["text"] for c in together] == alone


def test_stream_with_logprobs_and_usage(client, setup):
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(setup.model_dir).all_special_tokens)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "ignore_eos": True, "temperature": 0, "logprobs": True, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events, done = read_sse(r)
    assert done and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    assert all(e["usage"] is None for e in events[:-1])
    for index in (0, 1):
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == index]
        scored = [c["logprobs"]["content"][0] for c in mine if c["logprobs"]]
        assert len(scored) == 6 and mine[-1]["finish_reason"] == "length"
        # The text leaves special tokens out; their logprobs entries still name them.
        assert "".join(s["token"] for s in scored if s["token"] not in special) == \
            "".join(c["delta"].get("content") or "" for c in mine)


# --- the official openai client -------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0,
        "extra_body": {"ignore_eos": True, "steering": {"scale": 2.0, "features": [{"index": 3, "op": "set", "value": 4.0}]}}}


def test_openai_client_chat_with_an_adapter_and_steering_extras(openai_client, client):
    out = openai_client.chat.completions.create(model="tiny", **CHAT)
    assert out.model == "tiny" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
    plain = openai_client.chat.completions.create(model="tiny", **{**CHAT, "extra_body": {"ignore_eos": True}})
    assert out.choices[0].message.content != plain.choices[0].message.content  # the extras steer


def test_openai_client_chat_stream_adds_up_to_the_completion(openai_client):
    whole = openai_client.chat.completions.create(model="tiny", **CHAT).choices[0]
    chunks = list(openai_client.chat.completions.create(model="tiny", stream=True, **CHAT))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_openai_client_completion_on_the_base_model(openai_client, setup):
    out = openai_client.completions.create(model=setup.model_dir.name, prompt="hello", max_tokens=5,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.usage.completion_tokens == 5
    streamed = openai_client.completions.create(model=setup.model_dir.name, prompt="hello", max_tokens=5,
                                                temperature=0, extra_body={"ignore_eos": True}, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_openai_client_unknown_model_raises_not_found(openai_client):
    import openai
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-4" in caught.value.message and caught.value.body["param"] == "model"


def test_openai_client_lists_models(openai_client, setup):
    ids = [m.id for m in openai_client.models.list()]
    assert ids[0] == setup.model_dir.name and "tiny" in ids


# --- lm-evaluation-harness, through a real server (slow) ------------------------------------------

MC_DOCS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "Which is the largest?", "choices": ["a mouse", "an elephant", "a cat"], "answer": 1},
    {"question": "What is frozen water called?", "choices": ["steam", "ice", "fog"], "answer": 1},
]
MC_TASK = """task: fsrl_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def run_multiple_choice(url: str, model_name: str, tokenizer_dir, tmp_path, monkeypatch) -> tuple[float, list]:
    """lm-evaluation-harness's accuracy on MC_DOCS through `url`/v1/completions, and each
    document's per-choice scores as it got them."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(MC_TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={model_name},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tokenizer_dir},num_concurrent=1,max_retries=1,max_length=512",
        tasks=["fsrl_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                         include_defaults=False),
        bootstrap_iters=0, log_samples=True)
    samples = sorted(results["samples"]["fsrl_tiny_mc"], key=lambda s: s["doc_id"])
    return results["results"]["fsrl_tiny_mc"]["acc,none"], [[r[0][0] for r in s["resps"]] for s in samples]


def own_multiple_choice(net, tokenizer) -> tuple[float, list]:
    """The same from the model's own log-probabilities: each choice scored by log p(" choice" |
    question), the best choice compared with the answer."""
    correct, all_scores = 0, []
    for doc in MC_DOCS:
        context = tokenizer(f"Question: {doc['question']}\nAnswer:")["input_ids"]
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer(f"Question: {doc['question']}\nAnswer: {choice}")["input_ids"]
            assert ids[:len(context)] == context
            scores.append(sum(own_logprobs(net, ids)[len(context) - 1:]))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        all_scores.append(scores)
    return correct / len(MC_DOCS), all_scores


@pytest.mark.slow
def test_lm_eval_harness_scores_choices_as_the_model_does(server, setup, model, tmp_path, monkeypatch,
                                                         default_engine):
    acc, scores = run_multiple_choice(server.url, setup.model_dir.name, setup.model_dir, tmp_path, monkeypatch)
    want_acc, want_scores = own_multiple_choice(*model)
    assert acc == want_acc
    for got, want in zip(scores, want_scores):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
def test_lm_eval_harness_accuracy_on_the_default_model_equals_its_own(default_server, tmp_path, monkeypatch):
    """The same on the real default model, where the questions have right answers to find."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsrl.models import DEFAULT_MODEL_NAME, ensure_default_model

    folder = ensure_default_model()
    acc, scores = run_multiple_choice(default_server.url, DEFAULT_MODEL_NAME, folder, tmp_path, monkeypatch)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want_acc, want_scores = own_multiple_choice(net, AutoTokenizer.from_pretrained(folder))
    assert acc == want_acc and acc >= 0.5  # a real model answers these
    for got, want in zip(scores, want_scores):
        assert got == pytest.approx(want, abs=1e-2)
