"""The adapters curve as a picture: throughput against distinct adapters in a batch (and, when
given, against adapters loaded), relative to the same batch unsteered, from the JSON that
`fsrl bench --adapters` (and `--adapters --loaded`) write.

    python scripts/plot_adapters_curve.py bench-results/bench-adapters.json \\
        [--loaded bench-results/bench-adapters-loaded.json] [--vllm bench-results/vllm-bench-adapters.json]
        [--out docs/img/adapters-curve.svg]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("distinct", type=Path, help="`fsrl bench --adapters` JSON")
    parser.add_argument("--loaded", type=Path, action="append", default=[],
                        help="`fsrl bench --adapters --loaded` JSON; once per engine")
    parser.add_argument("--vllm", type=Path, default=None,
                        help="`fsrl bench --engine vllm --bank-slots 64` JSON: its adapter and K=... rows, dashed")
    parser.add_argument("--out", type=Path, default=Path("docs/img/adapters-curve.svg"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, and searchable
    import matplotlib.pyplot as plt

    distinct = json.loads(args.distinct.read_text())
    panels = 2 if args.loaded else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    for batch in sorted({r["batch"] for r in distinct["rows"]}):
        rows = [r for r in distinct["rows"] if r["batch"] == batch and r["distinct"]]
        ax.plot([r["distinct"] for r in rows], [r["ratio_to_stock"] for r in rows], marker="o", label=f"batch {batch}")
    if args.vllm:
        vllm = json.loads(args.vllm.read_text())
        for batch in sorted({r["batch"] for r in vllm["rows"]}):
            points = sorted((1 if r["mode"] == "adapter" else int(r["mode"][2:].split()[0]), r["ratio"])
                            for r in vllm["rows"] if r["batch"] == batch
                            and (r["mode"] == "adapter" or r["mode"].startswith("K=")))
            ax.plot(*zip(*points), marker="s", linestyle="--", label=f"vLLM, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the batch")
    ax.set_ylabel("tok/s, / the batch unsteered")
    ax.set_title(f"{distinct['setup']}" + (": fsrl engine (solid), vLLM (dashed)" if args.vllm else ""),
                 fontsize=9)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    if args.loaded:
        ax = axes[0][1]
        for path in args.loaded:
            loaded = json.loads(path.read_text())
            vllm_run = loaded.get("engine") == "vllm"
            for batch in sorted({r["batch"] for r in loaded["rows"]}):
                rows = [r for r in loaded["rows"] if r["batch"] == batch and r["loaded"]]
                ax.plot([r["loaded"] for r in rows], [r["ratio_to_stock"] for r in rows],
                        marker="s" if vllm_run else "o", linestyle="--" if vllm_run else "-",
                        label=f"{'vLLM, ' if vllm_run else ''}batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"adapters loaded ({loaded['slots']} device slots; a batch uses up to 16)")
        ax.set_ylabel("tok/s, / the batch unsteered")
        ax.set_title("fsrl serve over HTTP", fontsize=9)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
