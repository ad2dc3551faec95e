"""Measure a demo adapter on the held-out prompts, as the demo README reports it.

    python -m fsrl.demo.evaluate --adapter adapters/concise --rule concise \
        --heldout data/demo/concise/heldout.jsonl [--scale 1.0|auto] [--threads 1]

1. Held-out SimPO loss (beta 10, gamma 5), preference accuracy and mean L0 of v on the held-out
   pairs, for the base model (steering off) and with the adapter: the trainer's own evaluation.
2. Win rate: every held-out prompt (all of them, not only those that made a pair) is answered
   twice, compare-style: steered and base with the same decoding and seed (greedy by default;
   `--temperature 0.7 --top-p 0.9` is the data's own sampling), the same budget as the data (96
   new tokens). The rule judges each (steered, base) pair; win rate = share of prompts where the
   rule prefers the steered answer (ties count against it). `--scale auto` first picks the
   steering scale on training prompts (every fourth), the same way, and reports that choice.
Writes <adapter>/eval.json and <adapter>/samples.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fsrl.demo.build_data import SAMPLING, chat_ids, seed_for
from fsrl.demo.prompts import demo_prompts
from fsrl.demo.rules import RULES

log = logging.getLogger(__name__)


SCALE_CANDIDATES = (0.25, 0.5, 0.75, 1.0)


def generate_texts(gen, tokenizer, prompts: list, steering, max_new_tokens: int, temperature: float,
                   top_p: float, batch_size: int, desc: str) -> list[str]:
    """One answer per prompt under `steering`; each prompt's seed is fixed (`seed_for`), so the
    steered and base answers of a prompt differ by the steering alone."""
    from tqdm.auto import tqdm

    from fsrl.generation import GenerationRequest, SamplingParams

    texts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        chunk = prompts[start:start + batch_size]
        requests = [GenerationRequest(chat_ids(tokenizer, p.text), steering, SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed_for(p.id, "eval"))) for p in chunk]
        texts += [r.text.strip() for r in gen.generate(requests)]
    return texts


def evaluate_adapter(adapter_dir: Path, rule_name: str, heldout: Path, scale: float | str = 1.0,
                     batch_size: int = 16, max_new_tokens: int = SAMPLING["max_new_tokens"],
                     temperature: float = 0.0, top_p: float = 1.0,
                     samples: int = 6, responses: Path = Path("data/demo/responses.jsonl")) -> dict:
    from fsrl.adapter import load_adapter
    from fsrl.generation import Generator
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

    gen = Generator(base, sae, setup.layer)
    decoding = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    batch_size=batch_size)
    selection = None
    if scale == "auto":
        # Chosen on training prompts (every fourth), never on the held-out ones it is judged on.
        tuning = [p for p in demo_prompts() if p.split == "train"][::4]
        plain = generate_texts(gen, base.tokenizer, tuning, RowSteering(), desc="tuning: base", **decoding)
        selection = {"prompts": len(tuning), "split": "train", "win_rate": {}}
        for candidate in SCALE_CANDIDATES:
            steered = generate_texts(gen, base.tokenizer, tuning, RowSteering(adapter, candidate),
                                     desc=f"tuning: scale {candidate}", **decoding)
            wins = sum(rule.judge(a, b) > 0 for a, b in zip(steered, plain))
            selection["win_rate"][candidate] = round(wins / len(tuning), 4)
        scale = max(SCALE_CANDIDATES, key=lambda c: selection["win_rate"][c])  # ties: the gentler
        selection["chosen"] = scale
        log.info("scale chosen on training prompts: %s (win rates %s)", scale, selection["win_rate"])

    prompts = [p for p in demo_prompts() if p.split == "heldout"]
    steered_texts = generate_texts(gen, base.tokenizer, prompts, RowSteering(adapter, scale),
                                   desc="held-out: steered", **decoding)
    plain_texts = generate_texts(gen, base.tokenizer, prompts, RowSteering(), desc="held-out: base",
                                 **decoding)
    outcomes, rows = [], []
    for p, steered, plain in zip(prompts, steered_texts, plain_texts):
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
        "scale_selection": selection,
        "heldout_pairs": base_eval.pairs,
        "simpo_loss": {"base": round(base_eval.loss, 4), "adapter": round(steered_eval.loss, 4),
                       "reduction": round(1 - steered_eval.loss / base_eval.loss, 4)},
        "accuracy": {"base": round(base_eval.accuracy, 4), "adapter": round(steered_eval.accuracy, 4)},
        "mean_l0": round(steered_eval.mean_l0, 1), "d_sae": sae.d_sae,
        "generation": {"prompts": n, "max_new_tokens": max_new_tokens,
                       "decoding": "greedy" if temperature <= 0 else
                       f"sampled (temperature {temperature}, top-p {top_p}, a seed per prompt, the same for both rows)",
                       "wins": wins, "ties": ties, "losses": n - wins - ties,
                       "win_rate": round(wins / n, 4)},
        "top_features": steered_eval.top_features[:10],
        "facts_mean": {side: {k: round(sum(r[f"{side}_facts"][k] for r in rows) / n, 3)
                              for k in rows[0][f"{side}_facts"]} for side in ("steered", "base")},
    }
    (adapter_dir / "eval.json").write_text(json.dumps({**report, "generations": rows}, indent=1) + "\n")
    write_samples(adapter_dir, samples)
    return report


def write_samples(adapter_dir: Path, count: int = 6) -> Path:
    """samples.md: `count` held-out generations spread over the topics, from eval.json."""
    report = json.loads((adapter_dir / "eval.json").read_text())
    rows, gen = report["generations"], report["generation"]
    lines = [f"# {report['adapter']}: held-out samples", "",
             f"Decoding: {gen['decoding']}; {gen['max_new_tokens']} new tokens, steering scale {report['scale']}; the verdict "
             f"is rule `{report['rule']}`'s. Every prompt's pair is in `eval.json`.", ""]
    marks = {1: "steered preferred", 0: "no preference", -1: "base preferred"}
    for r in rows[:: max(1, len(rows) // count)][:count]:
        lines += [f"## {r['prompt']}  ({marks[r['verdict']]})", "", "**steered**", "", "```text",
                  r["steered"], "```", "", "**base**", "", "```text", r["base"], "```", ""]
    path = adapter_dir / "samples.md"
    path.write_text("\n".join(lines))
    return path


def max_activating(base, sae, layer: int, texts: list[str], indices: list[int], k: int = 3,
                   width: int = 6) -> dict[int, list[str]]:
    """For each feature, the k tokens of `texts` where the SAE activates it most, each shown with
    a few tokens either side (the token itself in [brackets]). Position 0 is left out (its
    residual norm is hundreds of times the rest: the SAE was trained without it)."""
    import torch

    best: dict[int, list[tuple[float, str]]] = {i: [] for i in indices}
    idx = torch.tensor(indices)
    with torch.no_grad():
        for text in texts:
            ids = base.tokenizer(text, add_special_tokens=False)["input_ids"][:160]
            f = sae.encode(base.layer_output(layer, torch.tensor([ids]))[0])[:, idx]      # (T, n)
            f[0] = 0.0
            for j, i in enumerate(indices):
                t = int(f[:, j].argmax())
                if f[t, j] <= 0:
                    continue
                left = base.tokenizer.decode(ids[max(0, t - width):t])
                right = base.tokenizer.decode(ids[t + 1:t + 1 + width])
                snippet = f"{left}[{base.tokenizer.decode([ids[t]])}]{right}".replace("\n", "\\n")
                best[i] = sorted(best[i] + [(float(f[t, j]), snippet)], reverse=True)[:k]
    return {i: [s for _, s in v] for i, v in best.items()}


def _scale(value: str) -> float | str:
    return value if value == "auto" else float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--rule", choices=sorted(RULES), required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--scale", type=_scale, default=1.0,
                        help="steering scale of the steered row, or `auto`: the best of "
                             f"{', '.join(map(str, SCALE_CANDIDATES))} on training prompts")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    report = evaluate_adapter(args.adapter, args.rule, args.heldout, args.scale, args.batch_size,
                              temperature=args.temperature, top_p=args.top_p)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
