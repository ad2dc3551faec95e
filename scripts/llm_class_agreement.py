"""The LLM classifier of `fsrl features classify` against the hand-labelled sample, through a
real OpenAI-compatible endpoint: by default this project's own `fsrl serve` on the default
model (started on loopback, stopped by its PID), or any endpoint given with --url/--model.
Reports, on the sample's 100 features, how many got a class, how many of those agree with the
hand labels, and the offline rule's agreement on the same features, side by side. Prints a
table and writes bench-results/llm_class_agreement.json.

    python scripts/llm_class_agreement.py                       # the default model, served here
    python scripts/llm_class_agreement.py --url URL --model M   # another endpoint
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import httpx

from fsrl.features import dashboards
from fsrl.features.classes import CLASSES, classify, llm_classes
from fsrl.sae import default_sae_dir, load_sae
from fsrl.testing import serving

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "features" / "class_sample.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an OpenAI-compatible base URL (default: start fsrl serve here)")
    parser.add_argument("--model", help="the model to ask (default: the served base model)")
    parser.add_argument("--out", default="bench-results/llm_class_agreement.json")
    args = parser.parse_args()

    sample = json.loads(SAMPLE.read_text())
    hand = {int(i): c for i, c in sample["labels"].items()}
    sae = load_sae(default_sae_dir())
    doc = dashboards.read(default_sae_dir(), sae)
    subset = {"features": [f for f in doc["features"] if f["index"] in hand]}

    log = Path(tempfile.mkdtemp(prefix="fsrl-classes-")) / "server.log"
    context = nullcontext(None) if args.url else serving(["--device", "cpu"], log, timeout_s=300)
    with context as proc:
        url = args.url or f"{proc.url}/v1"
        model = args.model or httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
        started = time.perf_counter()
        found, failed = llm_classes(subset, sae.info.labels, url, model, progress=True)
        seconds = time.perf_counter() - started

    rule = {f["index"]: classify(f) for f in subset["features"]}
    answered = sorted(found)
    llm_agree = sum(found[i][0] == hand[i] for i in answered)
    rule_agree_answered = sum(rule[i] == hand[i] for i in answered)
    rule_agree_all = sum(rule[i] == hand[i] for i in hand)
    confusion = Counter((hand[i], found[i][0]) for i in answered)
    report = {"endpoint": "fsrl serve (this project)" if not args.url else url, "model": model,
              "features": len(hand), "answered": len(answered), "no_class": failed,
              "llm_agree": llm_agree, "rule_agree_on_answered": rule_agree_answered,
              "rule_agree_all": rule_agree_all, "seconds": round(seconds, 1),
              "llm_classes": dict(Counter(c for c, _ in found.values())),
              "hand_classes": dict(Counter(hand.values())),
              "confusion_hand_to_llm": {f"{h}->{p}": n for (h, p), n in sorted(confusion.items())}}
    print(f"{'':<32} {'answered':>9} {'agree':>6} {'share':>7}")
    print(f"{'LLM (' + model[:25] + ')':<32} {len(answered):>9} {llm_agree:>6} "
          f"{llm_agree / max(len(answered), 1):>7.0%}")
    print(f"{'rule, same features':<32} {len(answered):>9} {rule_agree_answered:>6} "
          f"{rule_agree_answered / max(len(answered), 1):>7.0%}")
    print(f"{'rule, all 100':<32} {len(hand):>9} {rule_agree_all:>6} {rule_agree_all / len(hand):>7.0%}")
    print("LLM classes:", report["llm_classes"], " hand classes:", report["hand_classes"],
          f" ({', '.join(CLASSES)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
