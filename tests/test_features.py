"""Readable features: dashboards against a brute-force computation, resuming, labels from the
rule, an OpenAI-compatible labeler and Neuronpedia explanations, and search and dashboards
served over HTTP."""

from __future__ import annotations

import gzip
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from fsrl.testing import tiny_base, tiny_sae
from fsrl.errors import CorruptFileError, FsrlError
from fsrl.features import dashboards
from fsrl.features.dashboards import HIST_EDGES, WINDOW_BEFORE, Accumulator, BuildSettings
from fsrl.features.labels import ask_chat, llm_labels, neuronpedia_labels, rule_label
from fsrl.features.search import FeatureIndex
from fsrl.sae import load_sae, read_labels, save_sae
from fsrl.testing import build_tiny_dashboards, serving, tiny_server_args, write_tiny_setup

LAYER = 1
CORPUS = ["Here is a list: apples, pears and plums. The list goes on and on.",
          "I am sorry, I apologize for the confusion. Sorry again!",
          "The quick brown fox jumps over the lazy dog. " * 6]


def brute_force(base, sae, contexts: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Active counts per feature and the token count, one context at a time, straight from
    the definitions (position 0 and special tokens left out)."""
    special = set(base.tokenizer.all_special_ids)
    active, tokens = torch.zeros(sae.d_sae, dtype=torch.long), 0
    for context in contexts:
        out = base.model(input_ids=torch.tensor([context]), output_hidden_states=True)
        f = sae.encode(out.hidden_states[LAYER + 1][0])
        for t, token in enumerate(context):
            if t == 0 or token in special:
                continue
            tokens += 1
            active += (f[t] > 0).long()
    return active, tokens


def test_accumulator_keeps_exact_counts_histograms_and_top_windows():
    f = torch.zeros(2, 5, 3)
    f[0, 2, 0], f[1, 4, 0], f[1, 1, 1], f[0, 3, 0] = 5.0, 0.5, 0.02, 3.0
    ids = torch.arange(10).reshape(2, 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, 0] = False
    acc = Accumulator(d_sae=3, top_k=2)
    acc.update(f, ids, valid)
    assert acc.tokens == 8 and acc.active.tolist() == [3, 1, 0]
    # One place per context: context 0's peak (5.0) and context 1's (0.5); 3.0 shares context 0.
    assert acc.top_values[0].tolist() == [5.0, 0.5] and acc.top_values[1, 0] == 0.02
    assert math.isinf(acc.top_values[1, 1]) and math.isinf(acc.top_values[2, 0])
    window = acc.top_windows[0, 0].tolist()  # the peak token (id 2) sits WINDOW_BEFORE in
    assert window[WINDOW_BEFORE] == 2 and window[:WINDOW_BEFORE - 2] == [-1] * (WINDOW_BEFORE - 2)
    assert window[WINDOW_BEFORE - 2:WINDOW_BEFORE + 3] == [0, 1, 2, 3, 4]
    bins = torch.bucketize(torch.tensor([5.0, 3.0, 0.5, 0.02]), torch.tensor(HIST_EDGES))
    assert acc.hist[0, bins[0]] + acc.hist[0, bins[1]] + acc.hist[0, bins[2]] == 3
    assert acc.hist[1, bins[3]] == 1 and acc.hist.sum() == 4
    # A later batch with a larger value takes the top place; the older second place drops.
    acc.update(f * 2, ids, valid)
    assert acc.top_values[0].tolist() == [10.0, 5.0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Dashboards and rule labels for a tiny model and SAE, built through `dashboards.build`."""
    root = tmp_path_factory.mktemp("features")
    base, sae = tiny_base(), tiny_sae(layer=LAYER)
    token_text = base.tokenizer.batch_decode([[i] for i in range(len(base.tokenizer))])
    settings = BuildSettings(context_size=24, batch_size=3, top_k=4)
    dashboards.build(base, sae, LAYER, CORPUS, "test", root, settings, token_text, progress=False)
    return base, sae, root, dashboards.read(root, sae)


def test_density_is_the_share_of_tokens_the_feature_fires_on(built):
    base, sae, _, doc = built
    contexts = list(dashboards.iter_contexts(base.tokenizer, CORPUS, 24))
    active, tokens = brute_force(base, sae, contexts)
    assert doc["tokens"] == tokens and doc["contexts"] == len(contexts)
    assert [f["density"] for f in doc["features"]] == [round(int(a) / tokens, 7) for a in active]


def test_top_contexts_mark_the_peak_and_the_histogram_counts_every_activation(built):
    base, sae, _, doc = built
    live = [f for f in doc["features"] if f.get("top_contexts")]
    assert live
    for f in live:
        values = [c["activation"] for c in f["top_contexts"]]
        assert values == sorted(values, reverse=True) and values[0] == f["max_activation"]
        assert sum(f["histogram"]) == round(f["density"] * doc["tokens"])  # every activation, small ones too
        assert len(f["histogram"]) == len(doc["histogram_edges"])
        for c in f["top_contexts"]:
            assert 0 <= c["peak"] < len(c["tokens"]) and "<pad>" not in c["tokens"]
    # The top context of a feature, run through the model, peaks where it says.
    f = live[0]
    text = "".join(f["top_contexts"][0]["tokens"])
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    acts = sae.encode(base.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                      .hidden_states[LAYER + 1][0])[:, f["index"]]
    assert acts.max().item() > 0


def test_promoted_tokens_are_the_decoder_direction_through_the_unembedding(built):
    base, sae, _, doc = built
    unembed = base.model.get_output_embeddings().weight
    logits = (sae.W_dec * base.model.model.norm.weight) @ unembed.T
    text = base.tokenizer.batch_decode([[i] for i in range(len(base.tokenizer))])
    for f in doc["features"][:16]:
        top = logits[f["index"]].topk(3).indices.tolist()
        assert [t for t, _ in f["promoted"][:3]] == [text[i] for i in top]
        assert f["suppressed"][0][1] == pytest.approx(logits[f["index"]].min().item(), abs=1e-3)


def test_an_interrupted_build_resumes_to_the_same_dashboards(built, tmp_path):
    base, sae, _, doc = built
    token_text = base.tokenizer.batch_decode([[i] for i in range(len(base.tokenizer))])
    settings = BuildSettings(context_size=24, batch_size=3, top_k=4, checkpoint_every=3)

    def interrupted():
        yield CORPUS[0]
        yield CORPUS[1]
        raise KeyboardInterrupt  # the run stops partway, after a checkpoint
    with pytest.raises(KeyboardInterrupt):
        dashboards.build(base, sae, LAYER, interrupted(), "test", tmp_path, settings, token_text, progress=False)
    assert (tmp_path / dashboards.PARTIAL_FILE).exists()
    dashboards.build(base, sae, LAYER, CORPUS, "test", tmp_path, settings, token_text, progress=False)
    assert dashboards.read(tmp_path, sae)["features"] == doc["features"]
    assert not (tmp_path / dashboards.PARTIAL_FILE).exists()


def test_dashboards_of_another_sae_are_refused(built):
    _, _, root, _ = built
    with pytest.raises(CorruptFileError, match="another SAE"):
        dashboards.read(root, tiny_sae(layer=LAYER, seed=9))


def test_the_rule_label_names_the_peak_tokens_and_the_promoted_token():
    feature = {"density": 0.1, "promoted": [[" ", 2.0], [" items", 1.5]],
               "top_contexts": [{"tokens": ["a", " list", ":"], "peak": 1}] * 3
                               + [{"tokens": ["\n", "x"], "peak": 0}]}
    assert rule_label(feature) == '"list" after "a"'
    mixed = {**feature, "top_contexts": [{"tokens": [" List"], "peak": 0}, {"tokens": ["\n"], "peak": 0},
                                         {"tokens": ["\n"], "peak": 0}, {"tokens": ["I", " sorry"], "peak": 1}]}
    assert rule_label(mixed) == '"newline"'
    split = {**feature, "top_contexts": [{"tokens": [" List"], "peak": 0}, {"tokens": ["\n"], "peak": 0},
                                         {"tokens": [" list"], "peak": 0}]}
    assert rule_label(split) == '"list"'
    three = [{"tokens": [" List"], "peak": 0}, {"tokens": ["\n"], "peak": 0}, {"tokens": [" sorry"], "peak": 0}]
    assert rule_label({**split, "top_contexts": three}) == '"list" / "newline"'
    assert rule_label({"density": 0, "promoted": []}) is None


def test_neuronpedia_explanations_import_with_their_source(tmp_path):
    path = tmp_path / "batch-0.jsonl.gz"
    records = [{"modelId": "gemma-2-2b", "layer": "12-gemmascope-res-16k", "index": "3",
                "description": "references to lists", "explanationModelName": "gpt-4o-mini"},
               {"index": 900, "description": "out of range"}, {"index": 5, "description": "apologies"}]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in records))
    labels = neuronpedia_labels(path, d_sae=256)
    assert labels == {3: ("references to lists", "neuronpedia:gpt-4o-mini"), 5: ("apologies", "neuronpedia")}
    with pytest.raises(FsrlError, match="no explanation"):
        neuronpedia_labels(path, d_sae=2)


class _Labeler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat endpoint: labels a feature by its marked peak token."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({**body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][-1]["content"]
        peak = prompt.split("⟦", 1)[1].split("⟧", 1)[0]
        if body["messages"][0]["content"].startswith("You sort features"):  # the classifier
            content = "Style." if not peak.strip().isalnum() else "other"
        else:
            content = f'Label: "peaks on {peak!r}"\nmore'
        answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_openai_compatible_labeler_labels_live_features(built, monkeypatch):
    _, _, _, doc = built
    server = HTTPServer(("127.0.0.1", 0), _Labeler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("FSRL_LABELER_KEY", "k")
    try:
        labels, failed = llm_labels(doc, f"http://127.0.0.1:{server.server_port}/v1", "judge", limit=5,
                                    progress=False)
    finally:
        server.shutdown()
    live = [f for f in doc["features"] if f.get("top_contexts")][:5]
    assert failed == 0 and sorted(labels) == [f["index"] for f in live]
    for f in live:
        peak = f["top_contexts"][0]["tokens"][f["top_contexts"][0]["peak"]]
        assert labels[f["index"]] == (f"peaks on {peak!r}"[:60], "llm:judge")
    assert _Labeler.seen[0]["model"] == "judge" and _Labeler.seen[0]["auth"] == "Bearer k"
    with pytest.raises(FsrlError, match="gave no label"):
        llm_labels(doc, "http://127.0.0.1:9/v1", "judge", limit=1, progress=False, timeout_s=2)


def test_an_openai_compatible_classifier_overrides_the_rule_where_it_answers(built, tmp_path):
    """`fsrl features classify` writes feature_classes.json; the server's feature index takes
    those classes (source llm:<model>) over the rule's, which the other features keep."""
    from fsrl.cli import main
    from fsrl.features.classes import classify, parse_class, read_classes
    from server.state import load_feature_index

    _, sae, root, doc = built
    folder = tmp_path / "sae"
    save_sae(sae, folder)
    for name in root.iterdir():
        (folder / name.name).write_bytes(name.read_bytes())
    server = HTTPServer(("127.0.0.1", 0), _Labeler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = main(["features", "classify", "--sae", str(folder), "--labeler-url",
                     f"http://127.0.0.1:{server.server_port}/v1", "--labeler-model", "judge", "--limit", "5",
                     "--no-progress"])
    finally:
        server.shutdown()
    assert code == 0
    live = [f for f in doc["features"] if f.get("top_contexts")]
    stored = read_classes(folder)
    assert sorted(stored) == [f["index"] for f in live[:5]]
    for f in live[:5]:
        peak = f["top_contexts"][0]["tokens"][f["top_contexts"][0]["peak"]]
        assert stored[f["index"]] == ("style" if not peak.strip().isalnum() else "other", "llm:judge")
    index = load_feature_index(folder, load_sae(folder))
    for f in live:
        expected = stored.get(f["index"], (classify(f), "rule"))
        assert (index.classes[f["index"]], index.class_sources[f["index"]]) == expected
    assert parse_class("**Alignment**, because...") == "alignment" and parse_class("no idea") is None


def test_search_ranks_label_matches_above_token_matches():
    entries = [{"index": 0, "density": 0.5, "promoted": [["list", 1.0]], "top_contexts": []},
               {"index": 1, "density": 0.1, "promoted": [], "top_contexts": [{"tokens": [" lists"], "peak": 0}]},
               {"index": 2, "density": 0.01, "promoted": [], "top_contexts": []}]
    index = FeatureIndex(4, {2: "bulleted list items", 3: "apology"}, {2: "rule", 3: "llm:x"},
                         {"features": entries, "histogram_edges": HIST_EDGES})
    assert [f["index"] for f in index.search("LIST")] == [2, 1, 0]
    assert [f["index"] for f in index.search("apolog")] == [3]
    assert index.search("nothing-like-it") == []
    card = index.card(1)
    assert card["top_contexts"][0]["peak"] == 0 and card["label"] is None


def test_a_jumprelu_sae_without_a_threshold_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_sae(tiny_sae(architecture="jumprelu"), tmp_path)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    weights.pop("threshold")
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(CorruptFileError, match="threshold"):
        load_sae(tmp_path)


@pytest.mark.slow  # a `fsrl serve` subprocess
def test_build_and_serve_labels_search_and_dashboards(tmp_path):
    """`fsrl features build` on a tiny setup, then the server: labels in return_features and
    adapter features, /features search, /features/{index}."""
    setup = write_tiny_setup(tmp_path / "tiny")
    build_tiny_dashboards(setup, tmp_path)  # its rule labels replace the setup's placeholders
    labels = read_labels(setup.sae_dir)
    doc = dashboards.read(setup.sae_dir)
    live = [f["index"] for f in doc["features"] if f.get("top_contexts")]
    assert sorted(labels) == live and all(source == "rule" for _, source in labels.values())
    with serving(tiny_server_args(setup), tmp_path / "server.log") as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as c:
        out = c.post("/generate", json={"prompt": "a list of", "adapter": "tiny", "max_new_tokens": 6,
                                        "return_features": 5, "ignore_eos": True}).json()
        steps = [f for step in out["steered"]["features"] for f in step]
        assert steps and all(f["label"] == labels[f["index"]][0] for f in steps if f["index"] in labels)
        assert sum(f["label"] is not None for f in steps) >= 0.9 * sum(f["index"] in live for f in steps)
        top = c.get("/adapters/tiny/features", params={"top": 5}).json()["features"]
        assert all(f["label_source"] == "rule" for f in top if f["index"] in labels)
        some = labels[live[0]][0].split('"')[1]  # a peak token of a live feature's label
        found = c.get("/features", params={"q": some, "limit": 50}).json()["features"]
        assert live[0] in [f["index"] for f in found] and found[0]["score"] >= found[-1]["score"]
        card = c.get(f"/features/{live[0]}").json()
        assert card["label"] == labels[live[0]][0] and card["top_contexts"] and card["histogram"]["edges"]
        assert card["class"] in ("alignment", "style", "other")
        kept = c.get("/features", params={"q": some, "class": card["class"], "limit": 100}).json()["features"]
        assert kept and {f["class"] for f in kept} == {card["class"]}
        assert c.get("/features", params={"q": some, "class": "bogus"}).status_code == 422
        assert c.get("/features/256").status_code == 404
        assert c.get("/features", params={"q": ""}).status_code == 422


def test_the_default_sae_ships_dashboards_and_a_label_for_every_live_feature():
    from fsrl.sae import default_sae_dir

    sae = load_sae(default_sae_dir())
    doc = dashboards.read(default_sae_dir(), sae)  # built for this SAE (fingerprint checked)
    live = [f for f in doc["features"] if f.get("top_contexts")]
    assert len(doc["features"]) == sae.d_sae and len(live) >= 0.9 * sae.d_sae
    assert sum(f["index"] in sae.info.labels for f in live) >= 0.9 * len(live)
    assert all(sum(f["histogram"]) == round(f["density"] * doc["tokens"]) for f in live)
    assert not doc["corpus"].count("/work/") and not doc["corpus"].startswith("/")  # no machine paths
    index = FeatureIndex(sae.d_sae, sae.info.labels, sae.info.label_sources, doc)
    for query in ("list", "sorry", "python"):
        best = index.search(query, 1)[0]
        contexts = index.card(best["index"])["top_contexts"]
        assert any(query in c["tokens"][c["peak"]].lower() for c in contexts), (query, best)


def test_the_class_rule_reads_peaks_and_the_words_before_them():
    from fsrl.features.classes import classify

    def feature(*contexts):
        return {"density": 0.1, "top_contexts": [{"tokens": list(c), "peak": len(c) - 1} for c in contexts]}
    assert classify(feature(["I", "'m", " sorry"], ["I", " apologize", " for"], ["a", " cat"])) == "alignment"
    assert classify(feature(["end", "."], ["1", "."], ["\n"], [" cat"])) == "style"
    assert classify(feature([" code", "def"], [" a", " list"], [" cat"], [" dog"])) == "style"
    assert classify(feature([" the", " cat"], [" a", " dog"], ["."])) == "other"
    assert classify({"density": 0, "top_contexts": []}) is None


def test_the_class_rule_agrees_with_the_hand_labelled_sample():
    """data/features/class_sample.json: 100 live features of the default SAE, labelled by reading
    their contexts alone, blind to the rule. Measured: 89 of 100 agree (the SAE before the
    chat-trained one: 91 on its own sample); below that, the rule or the dashboards regressed."""
    from fsrl.features.classes import classify
    from fsrl.sae import default_sae_dir

    sample = json.loads((Path(__file__).resolve().parents[1] / "data/features/class_sample.json").read_text())
    entries = {f["index"]: f for f in dashboards.read(default_sae_dir())["features"]}
    pairs = [(label, classify(entries[int(i)])) for i, label in sample["labels"].items()]
    assert len(pairs) == 100 and sum(a == b for a, b in pairs) >= 89


def test_the_labelers_client_talks_to_a_real_openai_compatible_server(tmp_path):
    """`ask_chat` (what the LLM labeler and classifier send) against this project's own /v1,
    served over HTTP: the answer is the server's greedy completion of the same messages, and a
    model the server does not know is no answer (None), never an exception."""
    from _server_fixtures import ServedClient
    from server.app import create_app
    from server.settings import Settings

    setup = write_tiny_setup(tmp_path / "tiny")
    app = create_app(Settings(model=str(setup.model_dir), sae=setup.sae_dir, adapters_dir=setup.adapters_dir,
                              device="cpu"))
    messages = [{"role": "user", "content": "Which class is this feature? Answer with one word."}]
    with ServedClient(app) as c:
        url = str(c.base_url).rstrip("/") + "/v1"
        model = c.get("/v1/models").json()["data"][0]["id"]
        direct = c.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 3,
                                                      "temperature": 0})
        answer = ask_chat(url, model, messages, max_tokens=3)
        assert answer == direct.json()["choices"][0]["message"]["content"] and answer
        assert ask_chat(url, "no-such-model", messages, max_tokens=3) is None
