"""`fsrl analyze` (fsrl.audit) on a tiny setup: usage counts against a token-by-token count,
ablations against an adapter with those features' weights zeroed, the steering-fraction edit,
the loss with L1 by hand, and the command and the server's card end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from scipy.stats import binomtest

from fsrl.sites import Site
from fsrl.testing import tiny_adapter, tiny_base, tiny_pairs, tiny_sae
from fsrl.adapter import WEIGHTS_FILE
from fsrl.audit import BUCKETS, AuditSettings, audit, keep_top_fraction, zero_features
from fsrl.cli import main
from fsrl.train.data import PreferenceDataset, load_pairs
from fsrl.train.trainer import bind_setup, evaluate
from fsrl.testing import serving, tiny_server_args, write_tiny_setup

LAYER = 1
# A fixed class map: every feature a class by its index, 200 and up unclassified.
CLASSES = {i: ("style", "alignment", "other")[i % 3] for i in range(200)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tiny_base()
    sae = tiny_sae(layer=LAYER)
    setup = bind_setup(base, sae, LAYER)
    adapter = tiny_adapter(sae, base)
    data = tiny_pairs(tmp_path_factory.mktemp("audit") / "pairs.jsonl", n=10)
    dataset = PreferenceDataset(load_pairs(data), base.tokenizer, 64)
    settings = AuditSettings(batch_size=3, random_seeds=2, l1=0.01, fractions=(0.1, 0.5))
    report = audit(setup, adapter, dataset, CLASSES, settings, progress=False)
    return setup, adapter, dataset, settings, report


def token_by_token_counts(setup, adapter, dataset):
    """Steered entries and SAE-active features per (part, class), one sequence at a time."""
    steered = {(p, b): 0 for p in ("prompt", "chosen", "rejected") for b in BUCKETS}
    active = dict(steered)
    for item in dataset.items:
        for part, response in (("chosen", item.chosen_ids), ("rejected", item.rejected_ids)):
            ids = torch.tensor([item.prompt_ids + response])
            x = setup.base.activations(Site(LAYER), ids)[0]
            v, f = adapter(x), setup.sae.encode(x)
            for t in range(1, ids.shape[1]):  # position 0 is never counted
                where = part if t >= len(item.prompt_ids) else "prompt"
                if where == "prompt" and part == "rejected":
                    continue  # the prompt counts once per pair
                for i in v[t].nonzero().flatten().tolist():
                    steered[where, CLASSES.get(i, "unclassified")] += 1
                for i in (f[t] > 0).nonzero().flatten().tolist():
                    active[where, CLASSES.get(i, "unclassified")] += 1
    return steered, active


def test_usage_counts_every_steered_entry_and_the_saes_base_rate_on_the_same_tokens(tiny):
    setup, adapter, dataset, _, report = tiny
    steered, active = token_by_token_counts(setup, adapter, dataset)
    for row in report.usage:
        parts = {"prompt": ["prompt"], "prompt+chosen": ["prompt", "chosen"],
                 "prompt+rejected": ["prompt", "rejected"]}[row["context"]]
        k = sum(steered[p, row["class"]] for p in parts)
        n = sum(steered[p, b] for p in parts for b in BUCKETS)
        a = sum(active[p, row["class"]] for p in parts)
        a_all = sum(active[p, b] for p in parts for b in BUCKETS)
        assert row["steered"] == k
        assert row["steered_share"] == pytest.approx(k / n, rel=1e-12)
        assert row["base_rate"] == pytest.approx(a / a_all, rel=1e-12)
        assert row["relative_change"] == pytest.approx((k / n) / (a / a_all) - 1, rel=1e-9)
        assert row["p_value"] == pytest.approx(binomtest(k, n, a / a_all).pvalue, rel=1e-9)
    assert {r["context"] for r in report.usage} == {"prompt", "prompt+chosen", "prompt+rejected"}


def test_a_class_ablation_is_the_adapter_with_those_features_weights_zeroed(tiny):
    setup, adapter, dataset, settings, report = tiny
    style = [i for i, c in CLASSES.items() if c == "style"]
    edited = tiny_adapter(setup.sae, setup.base)
    with torch.no_grad():  # relu(0 x + 0) = 0: those features are never pushed
        edited.W[:, style] = 0.0
        edited.b[style] = 0.0
    expected = evaluate(setup.base, setup.hook, edited, dataset, settings.train_config())
    row = next(r for r in report.ablations if r["name"] == "style zeroed")
    assert row["features"] == len(style)
    assert row["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert row["accuracy"] == expected.accuracy


def test_random_ablations_zero_same_size_sets_with_their_own_seeds(tiny):
    *_, report = tiny
    rows = [r for r in report.ablations if r["name"].startswith("random")]
    sizes = {c: sum(1 for v in CLASSES.values() if v == c) for c in ("style", "alignment")}
    assert [(r["name"], r["features"]) for r in rows] == [
        ("random, style size", sizes["style"])] * 2 + [("random, alignment size", sizes["alignment"])] * 2
    assert len({r["seed"] for r in rows}) == 4


def test_the_sweep_runs_from_the_base_model_to_the_adapter(tiny):
    setup, adapter, dataset, settings, report = tiny
    cfg = settings.train_config()
    assert [r["fraction"] for r in report.sweep] == [0.0, 0.1, 0.5, 1.0]
    assert report.sweep[0]["loss"] == evaluate(setup.base, setup.hook, None, dataset, cfg).loss
    assert report.sweep[-1]["loss"] == evaluate(setup.base, setup.hook, adapter, dataset, cfg).loss
    zero = evaluate(setup.base, setup.hook, keep_top_fraction(adapter, 0.0), dataset, cfg)
    assert zero.loss == pytest.approx(report.sweep[0]["loss"], rel=1e-6) and zero.mean_l0 == 0
    l0 = [r["mean_l0"] for r in report.sweep]
    assert l0 == sorted(l0) and l0[0] == 0


def test_keep_top_fraction_keeps_the_largest_entries_per_token():
    sae = tiny_sae(d_sae=5)
    adapter = tiny_adapter(sae)
    v = torch.tensor([[0.0, 3.0, -1.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0]])
    edit = keep_top_fraction(adapter, 0.5).edit  # ceil(0.5 * 3) = 2 and ceil(0.5 * 1) = 1 kept
    assert torch.equal(edit(v), torch.tensor([[0.0, 3.0, 0.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(keep_top_fraction(adapter, 1.0).edit(v), v)
    assert torch.equal(keep_top_fraction(adapter, 0.0).edit(v), torch.zeros_like(v))
    assert torch.equal(zero_features(adapter, [1, 4], "x").edit(v)[0], torch.tensor([0.0, 0.0, -1.0, 2.0, 0.0]))


def test_the_loss_with_l1_adds_lambda_times_the_mean_l1_of_v_over_every_real_token(tiny):
    setup, adapter, dataset, settings, report = tiny
    total, tokens = 0.0, 0
    for item in dataset.items:
        for response in (item.chosen_ids, item.rejected_ids):
            x = setup.base.activations(Site(LAYER), torch.tensor([item.prompt_ids + response]))[0]
            total += float(adapter(x).abs().sum())
            tokens += x.shape[0]
    ev = report.evaluation
    assert ev["mean_l1"] == pytest.approx(total / tokens, rel=1e-5)
    assert ev["loss_with_l1"] == pytest.approx(ev["loss"] + 0.01 * total / tokens, rel=1e-5)
    assert report.summary()["eval_loss_with_l1"] == round(ev["loss_with_l1"], 4)


def test_top_features_carry_their_class(tiny):
    *_, report = tiny
    top = report.top_features
    assert top and [f["mean_abs_v"] for f in top] == sorted((f["mean_abs_v"] for f in top), reverse=True)
    assert all(f["class"] == CLASSES.get(f["index"], "unclassified") for f in top)


@pytest.mark.slow
def test_analyze_writes_the_report_and_the_server_serves_its_card(tmp_path):
    """`fsrl features build`, then `fsrl analyze` on the tiny setup's adapter: report.json's
    numbers are the library's, report.html inlines its plots, and /adapters/tiny/card serves
    the summary (404 for an adapter without a report)."""
    setup = write_tiny_setup(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} said {i} times, then left." for i, w in enumerate("abcdefghij" * 4)))
    data = tiny_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["--sae", str(setup.sae_dir), "--model", str(setup.model_dir), "--device", "cpu"]
    assert main(["features", "build", *common, "--text", str(corpus), "--context-size", "24", "--no-progress"]) == 0
    assert main(["analyze", str(setup.adapters_dir / "tiny"), "--data", str(data), *common,
                 "--seeds", "2", "--fractions", "0.25,0.5", "--no-progress"]) == 0
    out = setup.adapters_dir / "tiny" / "analysis"
    doc = json.loads((out / "report.json").read_text())
    assert doc["format"] == "fsrl-audit" and doc["pairs"] == 8 and doc["adapter"]["id"] == "tiny"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "http" not in page.split("<body>")[1]
    assert [r["fraction"] for r in doc["sweep"]] == [0.0, 0.25, 0.5, 1.0]
    with serving(tiny_server_args(setup), tmp_path / "server.log") as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as c:
        card = c.get("/adapters/tiny/card")
        assert card.status_code == 200, card.text
        assert card.json() == {"adapter": "tiny", "site": "blocks.1.hook_resid_post", "summary": doc["summary"],
                               "report": "analysis/report.json", "weights_match": True}
        # Other weights in the folder: the served adapter is still the analysed one until a replace.
        shutil.copyfile(setup.adapters_dir / "more" / "tiny-b" / WEIGHTS_FILE,
                        setup.adapters_dir / "tiny" / WEIGHTS_FILE)
        assert c.get("/adapters/tiny/card").json()["weights_match"] is True
        c.post("/adapters", json={"id": "tiny", "path": "tiny", "replace": True}).raise_for_status()
        assert c.get("/adapters/tiny/card").json()["weights_match"] is False
        c.post("/adapters", json={"id": "b", "path": "more/tiny-b"}).raise_for_status()
        missing = c.get("/adapters/b/card")
        assert missing.status_code == 404 and "fsrl analyze" in missing.json()["error"]["message"]
        assert c.get("/adapters/nope/card").status_code == 404


def test_analyze_names_a_bad_flag_in_one_line(tmp_path):
    data = tiny_pairs(tmp_path / "pairs.jsonl", n=2)
    done = subprocess.run([sys.executable, "-m", "fsrl.cli", "analyze", str(tmp_path), "--data", str(data),
                           "--fractions", "0.5,2"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "--fractions" in done.stderr


def test_settings_take_the_adapters_own_loss_and_lambda_unless_a_flag_overrides_them():
    sae = tiny_sae()
    adapter = tiny_adapter(sae)
    adapter.config.training = {"loss": "dpo", "beta": 0.2, "l1_coefficient": 0.05, "max_length": 128}
    kept = AuditSettings.for_adapter(adapter, l1=None, batch_size=2)  # --l1 not given
    assert (kept.loss, kept.beta, kept.l1, kept.max_length, kept.batch_size) == ("dpo", 0.2, 0.05, 128, 2)
    assert AuditSettings.for_adapter(adapter, l1=0.5).l1 == 0.5


def test_the_report_page_is_its_template_filled_and_escapes_what_it_shows():
    """report.html comes from fsrl/templates/audit_report.html.j2 (jinja2, autoescaped): a label
    or an id that holds markup is shown as text."""
    import json as _json

    from fsrl.audit_report import render_html

    doc = _json.loads((Path(__file__).resolve().parents[1] / "adapters" / "concise" / "analysis" / "report.json").read_text())
    doc["top_features"][0]["label"] = '<img src=x onerror="alert(1)">'
    doc["adapter"]["id"] = "<b>bold</b>"
    page = render_html(doc)
    assert "<img src=x" not in page and "&lt;img src=x onerror=" in page
    assert "<title>fsrl analyze: &lt;b&gt;bold&lt;/b&gt;</title>" in page
    assert page.count('<img alt="') == 3 and page.count("<table>") == 6  # meta, evaluation, (a) to (d)


def test_prune_keeps_the_features_pushed_on_held_out_pairs_reports_the_loss_and_serves(tmp_path, capsys):
    """`fsrl adapter prune` on the tiny setup: at --min-share 0 the features never pushed on the
    pairs go (here the half whose bias keeps them off) and the held-out loss stays what it was
    (their v was zero on every token); a higher share keeps fewer and reports the change; an
    adapter with nothing to prune is one line; the pruned folder loads over HTTP in less memory."""
    from _server_fixtures import ServedClient
    from fsrl.adapter import load_adapter, save_adapter
    from fsrl.cli import main
    from server.app import create_app
    from server.settings import Settings

    setup = write_tiny_setup(tmp_path / "tiny")
    data = tiny_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["--data", str(data), "--sae", str(setup.sae_dir), "--model", str(setup.model_dir), "--device", "cpu"]
    capsys.readouterr()  # the setup's own progress lines
    assert main(["adapter", "prune", str(setup.adapters_dir / "tiny"), *common]) == 2
    assert [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line] == [
        "fsrl: error: every feature is pushed on more than 0.0 of the data's tokens: nothing to prune "
        "(a higher --min-share drops the rarest)"]
    half_off = load_adapter(setup.adapters_dir / "tiny")
    with torch.no_grad():
        half_off.b[128:] = -1e4  # relu(z - 1e4) = 0: these features never fire
    save_adapter(half_off, setup.adapters_dir / "half-off")
    assert main(["adapter", "prune", str(setup.adapters_dir / "half-off"), *common]) == 0
    record = json.loads((setup.adapters_dir / "half-off-pruned" / "adapter.json").read_text())["training"]["pruned"]
    assert record["min_share"] == 0 and record["pairs"] == 8 and 0 < record["kept"] <= 128 and record["d_sae"] == 256
    assert abs(record["loss_change"]) < 1e-5 and record["accuracy_after"] == record["accuracy_before"]
    assert record["loss_before"] < record["base_loss"]  # the adapter does something on these pairs
    assert record["bytes_after"] < record["bytes_before"] * (record["kept"] / 256 + 0.05)
    out = setup.adapters_dir / "tiny-half"
    assert main(["adapter", "prune", str(setup.adapters_dir / "tiny"), *common, "--min-share", "0.5",
                 "--out", str(out)]) == 0
    half = json.loads((out / "adapter.json").read_text())["training"]["pruned"]
    assert half["kept"] < 256 and half["largest_dropped_share"] <= 0.5 and "loss_change" in half
    with ServedClient(create_app(Settings(model=str(setup.model_dir), sae=setup.sae_dir,
                                          adapters_dir=setup.adapters_dir, device="cpu"))) as c:
        dense, pruned = (c.post("/adapters", json={"id": i, "path": p}) for i, p in
                         (("dense", "half-off"), ("pruned", "half-off-pruned")))
        assert dense.status_code == pruned.status_code == 201, pruned.text
        assert pruned.json()["bytes"] < dense.json()["bytes"] and pruned.json()["metadata"]["columns"] == record["kept"]
        body = {"prompt": "hello", "max_new_tokens": 6, "ignore_eos": True}
        answers = [c.post("/generate", json={**body, "adapter": a}).json()["steered"]["text"] for a in ("dense", "pruned")]
        assert answers[0] == answers[1]  # the dropped half never fires, on any prompt
