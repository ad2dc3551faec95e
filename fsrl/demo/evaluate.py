"""Measure a demo adapter on the held-out prompts, as the demo README reports it.

    python -m fsrl.demo.evaluate --adapter adapters/concise --rule concise \
        --heldout data/demo/concise/heldout.jsonl [--scale 1.0] [--threads 1]

1. Held-out SimPO loss (beta 10, gamma 5), preference accuracy and mean L0 of v on the held-out
   pairs, for the base model (steering off) and with the adapter: the trainer's own evaluation.
2. Win rate: every held-out prompt (all of them, not only those that made a pair) is generated
   twice in one batch, compare-style: steered and base, greedy, the same budget as the data (96
   new tokens). The rule judges each (steered, base) pair; win rate = share of prompts where the
   rule prefers the steered answer (ties count against it).
Writes <adapter>/eval.json and <adapter>/samples.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fsrl.demo.build_data import SAMPLING, chat_ids
from fsrl.demo.prompts import demo_prompts
from fsrl.demo.rules import RULES

log = logging.getLogger(__name__)


def evaluate_adapter(adapter_dir: Path, rule_name: str, heldout: Path, scale: float = 1.0,
                     batch_size: int = 16, max_new_tokens: int = SAMPLING["max_new_tokens"],
                     samples: int = 6, responses: Path = Path("data/demo/responses.jsonl")) -> dict:
    from tqdm.auto import tqdm

    from fsrl.adapter import load_adapter
    from fsrl.generation import GenerationRequest, Generator, SamplingParams
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.steering import RowSteering
    from fsrl.train.data import PreferenceDataset, load_pairs
    from fsrl.train.trainer import TrainConfig, bind_setup, evaluate

    rule = RULES[rule_name]
    base = load_base_model(None, "cpu")
    sae = load_sae(default_sae_dir())
    setup = bind_setup(base, sae, None)
    adapter = load_adapter(adapter_dir, sae=sae, layer=setup.layer, base_model_fingerprint=base.fingerprint)
    trained = adapter.config.training or {}

    cfg = TrainConfig(data=str(heldout), out="-", loss="simpo", beta=10.0, gamma=5.0,
                      max_length=trained.get("max_length", 256), batch_size=8, progress=False)
    ds = PreferenceDataset(load_pairs(heldout), base.tokenizer, cfg.max_length)
    base_eval = evaluate(base, setup.hook, None, ds, cfg)
    steered_eval = evaluate(base, setup.hook, adapter, ds, cfg, feature_stats=True)

    prompts = [p for p in demo_prompts() if p.split == "heldout"]
    gen = Generator(base, sae, setup.layer)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    outcomes, rows = [], []
    for start in tqdm(range(0, len(prompts), batch_size // 2), desc="generating", unit="batch"):
        chunk = prompts[start:start + batch_size // 2]
        requests = []
        for p in chunk:
            ids = chat_ids(base.tokenizer, p.text)
            requests += [GenerationRequest(ids, RowSteering(adapter, scale), greedy),
                         GenerationRequest(ids, RowSteering(), greedy)]
        results = gen.generate(requests)
        for i, p in enumerate(chunk):
            steered, plain = results[2 * i].text.strip(), results[2 * i + 1].text.strip()
            verdict = rule.judge(steered, plain)
            outcomes.append(verdict)
            rows.append({"prompt": p.text, "steered": steered, "base": plain, "verdict": verdict,
                         "steered_facts": rule.describe(steered), "base_facts": rule.describe(plain)})
    # Whole conversations (chat template included) of every sixth demo response.
    texts = [base.tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["text"]}], tokenize=False)
        for r in map(json.loads, open(responses).read().splitlines()[::6])] if responses.exists() else []
    examples = max_activating(base, sae, setup.layer, texts, [f["index"] for f in steered_eval.top_features[:10]])
    for f in steered_eval.top_features[:10]:
        f["examples"] = examples[f["index"]]
    n = len(outcomes)
    wins, ties = sum(o > 0 for o in outcomes), sum(o == 0 for o in outcomes)
    report = {
        "adapter": adapter.id, "rule": rule.name, "rule_summary": rule.summary, "scale": scale,
        "heldout_pairs": base_eval.pairs,
        "simpo_loss": {"base": round(base_eval.loss, 4), "adapter": round(steered_eval.loss, 4),
                       "reduction": round(1 - steered_eval.loss / base_eval.loss, 4)},
        "accuracy": {"base": round(base_eval.accuracy, 4), "adapter": round(steered_eval.accuracy, 4)},
        "mean_l0": round(steered_eval.mean_l0, 1), "d_sae": sae.d_sae,
        "generation": {"prompts": n, "decoding": "greedy", "max_new_tokens": max_new_tokens,
                       "wins": wins, "ties": ties, "losses": n - wins - ties,
                       "win_rate": round(wins / n, 4)},
        "top_features": steered_eval.top_features[:10],
        "facts_mean": {side: {k: round(sum(r[f"{side}_facts"][k] for r in rows) / n, 3)
                              for k in rows[0][f"{side}_facts"]} for side in ("steered", "base")},
    }
    (adapter_dir / "eval.json").write_text(json.dumps({**report, "generations": rows}, indent=1) + "\n")
    lines = [f"# {adapter.id}: held-out samples (greedy, {max_new_tokens} new tokens, scale {scale})", ""]
    for r in rows[:samples]:
        mark = {1: "steered preferred", 0: "no preference", -1: "base preferred"}[r["verdict"]]
        lines += [f"## {r['prompt']}  ({mark})", "", "**steered**", "", r["steered"], "",
                  "**base**", "", r["base"], ""]
    (adapter_dir / "samples.md").write_text("\n".join(lines))
    return report


class _Stop(Exception):
    pass


def max_activating(base, sae, layer: int, texts: list[str], indices: list[int], k: int = 3,
                   width: int = 6) -> dict[int, list[str]]:
    """For each feature, the k tokens of `texts` where the SAE activates it most, each shown with
    a few tokens either side (the token itself in [brackets]). Position 0 is left out (its
    residual norm is hundreds of times the rest: the SAE was trained without it)."""
    import torch

    best: dict[int, list[tuple[float, str]]] = {i: [] for i in indices}
    idx = torch.tensor(indices)
    captured = {}

    def grab(module, args, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output
        raise _Stop  # nothing above the hook is needed

    handle = base.layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            for text in texts:
                ids = base.tokenizer(text, add_special_tokens=False)["input_ids"][:160]
                try:
                    base.model(input_ids=torch.tensor([ids], device=base.device))
                except _Stop:
                    pass
                f = sae.encode(captured["x"][0])[:, idx]                              # (T, n)
                f[0] = 0.0
                for j, i in enumerate(indices):
                    t = int(f[:, j].argmax())
                    if f[t, j] <= 0:
                        continue
                    left = base.tokenizer.decode(ids[max(0, t - width):t])
                    right = base.tokenizer.decode(ids[t + 1:t + 1 + width])
                    snippet = f"{left}[{base.tokenizer.decode([ids[t]])}]{right}".replace("\n", "\\n")
                    best[i] = sorted(best[i] + [(float(f[t, j]), snippet)], reverse=True)[:k]
    finally:
        handle.remove()
    return {i: [s for _, s in v] for i, v in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--rule", choices=sorted(RULES), required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    report = evaluate_adapter(args.adapter, args.rule, args.heldout, args.scale, args.batch_size)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
