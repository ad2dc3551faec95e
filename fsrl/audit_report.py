"""`report.json` and a self-contained `report.html` (matplotlib PNGs inlined) for an audit."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import jinja2

from fsrl.adapter import WEIGHTS_FILE
from fsrl.audit import ABLATED_CLASSES, BUCKETS, CONTEXTS
from fsrl.files import sha256_of

ANALYSIS_DIR = "analysis"  # beside the adapter: where the server looks for a card
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_TEMPLATE = "audit_report.html.j2"  # fsrl/templates/


def write_report(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write both files into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    html_path.write_text(render_html(doc))
    return json_path, html_path


def read_card(adapter_dir: Path, root: Path | None = None,
              weights_sha256_16: str | None = None) -> dict[str, Any] | None:
    """The summary of the report `fsrl analyze` wrote beside an adapter
    (`<adapter>/analysis/report.json`), or None when there is none (or, with `root`, when it
    lies outside `root`). `weights_match`: the report was made on these weights (their digest
    `weights_sha256_16`; by default, the weights now in the folder)."""
    path = adapter_dir / ANALYSIS_DIR / REPORT_JSON
    if not path.is_file() or (root is not None and not path.resolve().is_relative_to(root)):
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and doc.get("format") == "fsrl-audit" and isinstance(doc.get("summary"), dict)):
        return None
    made_on = (doc.get("adapter") or {}).get("weights_sha256_16")
    return {"summary": doc["summary"], "report": f"{ANALYSIS_DIR}/{REPORT_JSON}",
            "weights_match": made_on is not None and made_on == (
                weights_sha256_16 or sha256_of(adapter_dir / WEIGHTS_FILE, 16))}


# ---------------------------------------------------------------------------------- plots

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _usage_plot(usage: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(CONTEXTS)
    for c, context in enumerate(CONTEXTS):
        values = [next((100 * r["relative_change"] for r in usage if r["context"] == context and r["class"] == b
                        and r["relative_change"] is not None), 0.0) for b in BUCKETS]
        ax.bar([i + (c - 1) * width for i in range(len(BUCKETS))], values, width, label=context)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(BUCKETS)), BUCKETS)
    ax.set_ylabel("steered share vs SAE base rate (%)")
    ax.set_title("(a) Usage by class, relative to the SAE's base rate")
    ax.legend(fontsize=8)
    return _png(fig)


def _ablation_plot(doc: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    rows = doc["ablations"]
    names = [r["name"] for r in rows if r.get("seed") is None]
    losses = [r["loss"] for r in rows if r.get("seed") is None]
    errors = [0.0] * len(names)
    for name in ABLATED_CLASSES:
        rand = [r["loss"] for r in rows if r["name"] == f"random, {name} size"]
        if rand:
            mean = sum(rand) / len(rand)
            names.append(f"random, {name} size\n(n={len(rand)})")
            losses.append(mean)
            errors.append((sum((x - mean) ** 2 for x in rand) / max(len(rand) - 1, 1)) ** 0.5)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(names)), losses, yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20, ha="right")
    ax.set_ylabel(f"held-out {doc['settings']['loss']} loss")
    ax.set_title("(c) Ablations in v (random sets: mean and sd over seeds)")
    return _png(fig)


def _sweep_plot(doc: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    sweep = doc["sweep"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    shown = [r for r in sweep if r["fraction"] > 0]
    ax.plot([r["fraction"] for r in shown], [r["loss"] for r in shown], marker="o")
    ax.axhline(sweep[0]["loss"], color="grey", linestyle="--", label="base model (fraction 0)")
    ax.set_xscale("log")
    ax.set_xlabel("share of v's non-zero entries kept per token (top by |v|)")
    ax.set_ylabel(f"held-out {doc['settings']['loss']} loss")
    ax.set_title("(d) Steering fraction")
    ax.legend(fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------------- html

def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def render_html(doc: dict[str, Any]) -> str:
    """One page, no external assets: the tables of report.json and three plots."""
    import matplotlib

    matplotlib.use("Agg")
    ev, s = doc["evaluation"], doc["summary"]
    title = f"fsrl analyze: {doc.get('adapter', {}).get('id', 'adapter')}"
    usage_rows = [[r["context"], r["class"], r["steered"], r["steered_share"], r["base_rate"],
                   None if r["relative_change"] is None else f"{100 * r['relative_change']:+.1f} %",
                   r["p_value"], r["width_share"], r["mass_share"]] for r in doc["usage"]]
    ablation_rows = [[r["name"], r.get("seed"), r.get("features"), r["loss"], r["accuracy"], r["mean_l0"]]
                     for r in doc["ablations"]]
    sweep_rows = [[r["fraction"], r["loss"], r["accuracy"], r["mean_l0"]] for r in doc["sweep"]]
    top_rows = [[f["index"], f.get("label"), f.get("class"), f["mean_abs_v"], f["mean_v"], f["active_share"]]
                for f in doc["top_features"]]
    meta = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in doc.items()
            if k in ("adapter", "model", "sae", "data", "fsrl_version")]
    evaluation = [["eval loss (no L1)", ev["loss"]],
                  [f"eval loss + {_fmt(ev['l1_coefficient'])} × mean ||v||₁", ev["loss_with_l1"]],
                  ["mean ||v||₁ per token", ev["mean_l1"]], ["accuracy", ev["accuracy"]],
                  ["mean L0 of v", ev["mean_l0"]], ["mean L0 / SAE width", s["mean_l0_share_of_width"]],
                  ["base model loss", ev["base_loss"]], ["base model accuracy", ev["base_accuracy"]]]
    # jinja2 escapes every value it puts in the page (autoescape): labels and ids are text.
    env = jinja2.Environment(loader=jinja2.PackageLoader("fsrl", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    return env.get_template(REPORT_TEMPLATE).render(
        title=title, doc=doc, meta=meta, evaluation=evaluation, usage_rows=usage_rows, top_rows=top_rows,
        ablation_rows=ablation_rows, sweep_rows=sweep_rows,
        class_sizes=", ".join(f"{k} {v}" for k, v in doc["class_sizes"].items()),
        plots={"usage": _usage_plot(doc["usage"]), "ablations": _ablation_plot(doc), "sweep": _sweep_plot(doc)})
