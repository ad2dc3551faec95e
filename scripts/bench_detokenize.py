"""Detokenisation cost per generated token: decoding a row's whole token list on every token
(before) against `fsrl.generation.IncrementalDetokenizer` (a short window per token), side by
side in one run, on the default model's tokenizer over README.md's text. Prints a table and
writes bench-results/detokenize.json.

    python scripts/bench_detokenize.py [--lengths 64,256,1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from fsrl.generation import IncrementalDetokenizer
from fsrl.models import ensure_default_model


def per_token_us(tokenizer, ids: list[int], incremental: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        grown: list[int] = []
        detokenizer = IncrementalDetokenizer(tokenizer)
        start = time.perf_counter()
        for token in ids:
            grown.append(token)
            if incremental:
                detokenizer.step(grown)
            else:
                tokenizer.decode(grown, skip_special_tokens=True)
        best = min(best, time.perf_counter() - start)
    return best * 1e6 / len(ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-results/detokenize.json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(progress=False))
    ids = tokenizer(Path("README.md").read_text(), add_special_tokens=False)["input_ids"]
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        whole = per_token_us(tokenizer, ids[:n], False, args.repeats)
        window = per_token_us(tokenizer, ids[:n], True, args.repeats)
        rows.append({"tokens": n, "whole_list_us_per_token": round(whole, 1),
                     "incremental_us_per_token": round(window, 1), "ratio": round(whole / window, 1)})
    print(f"{'tokens':>7} {'whole list (us/token)':>22} {'incremental (us/token)':>23} {'ratio':>6}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['whole_list_us_per_token']:>22} {r['incremental_us_per_token']:>23} {r['ratio']:>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
