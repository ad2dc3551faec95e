"""Measure a demo adapter, as its README reports it.

    python -m fsrl.demo.evaluate --adapter adapters/concise --rule concise \
        --selection data/demo/concise/heldout.jsonl [--scale 1.0|auto] [--threads 1]

1. On the selection pairs (the old held-out pairs: not trained on, but looked at while the first
   demo adapters were tuned): SimPO loss (beta 10, gamma 5) without and with the adapter's
   lambda * mean ||v||_1, preference accuracy and mean L0 of v, base model and adapter.
2. On the rule's frozen evaluation prompts (`fsrl.prompts.frozen_eval_set`, never used to
   choose anything; their digest is checked): every prompt answered twice, compare-style, steered and
   base with the same decoding, seed and budget (256 new tokens: the base model usually
   finishes). Rule `EVAL_RULES[rule]` (fsrl/demo/rules.py) judges each pair. Reported: wins,
   ties, losses, the win rate with its 95 % Wilson interval, wins where the base answer ran
   past the budget, and beside them coherence of both sides: repeated word 4-grams, repeated
   list items, and perplexity under the base model (steering off).
   `--scale auto` first picks the steering scale on prompts apart from them
   (`fsrl.prompts.tuning_prompts`): the candidate the rule prefers most often against base.
Writes <out>/eval.json and <out>/samples.md (stratified: one sample per template and outcome).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from fsrl.corpus import chat_ids
from fsrl.demo.build_data import seed_for
from fsrl.prompts import DemoPrompt, frozen_eval_set, tuning_prompts
from fsrl.demo.rules import EVAL_RULES, RULES, Answer, distinct_items, has_list, is_naming_request, list_items, on_topic_list

log = logging.getLogger(__name__)

SCALE_CANDIDATES = (0.5, 1.0, 1.5)
EVAL_MAX_NEW_TOKENS = 256
TUNING_MAX_NEW_TOKENS = {"concise": 96, "bullets": EVAL_MAX_NEW_TOKENS}  # concise: its data's budget
OUTCOMES = {1: "win", 0: "tie", -1: "loss"}


def generate_answers(gen, tokenizer, prompts: Sequence[DemoPrompt], steering, max_new_tokens: int,
                     temperature: float, top_p: float, batch_size: int, desc: str,
                     presence_penalty: float = 0.0) -> list[Answer]:
    """One answer per prompt under `steering`; each prompt's seed is fixed (`seed_for`), so the
    steered and base answers of a prompt differ by the steering alone."""
    from tqdm.auto import tqdm

    from fsrl.generation import GenerationRequest
    from fsrl.sampling import SamplingParams

    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        chunk = prompts[start:start + batch_size]
        requests = [GenerationRequest(chat_ids(tokenizer, p.text), steering, SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            presence_penalty=presence_penalty, seed=seed_for(p.id, "eval"))) for p in chunk]
        answers += [Answer(r.text.strip(), r.finish_reason != "length", p.topic, is_naming_request(p.text))
                    for p, r in zip(chunk, gen.generate(requests))]
    return answers


def decoding_label(temperature: float, top_p: float, presence_penalty: float) -> str:
    """How answers were decoded, in words (reports, READMEs, and what `--reuse-base` compares)."""
    label = "greedy" if temperature <= 0 else \
        f"sampled (temperature {temperature}, top-p {top_p}, a seed per prompt, the same for both rows)"
    return label + (f", presence penalty {presence_penalty:g}" if presence_penalty else "")


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (scipy's)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0: none repeat)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def perplexities(base, prompts: Sequence[DemoPrompt], answers: Sequence[Answer]) -> list[float | None]:
    """Perplexity of each answer under the base model (steering off), given its prompt."""
    import torch

    from fsrl.train.losses import sequence_logps

    out: list[float | None] = []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            prompt = chat_ids(base.tokenizer, p.text)
            answer = list(base.tokenizer(a.text, add_special_tokens=False)["input_ids"])
            if not answer:
                out.append(None)
                continue
            ids = torch.tensor([prompt + answer])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(prompt):] = True
            logps = sequence_logps(base.model(input_ids=ids.to(base.device)).logits, ids.to(base.device),
                                   mask.to(base.device))
            out.append(math.exp(-float(logps.mean[0])))
    return out


def coherence(answers: Sequence[Answer], ppl: Sequence[float | None]) -> dict[str, float]:
    """Means over answers: repeated 4-gram share, repeated list items, perplexity (median too);
    the share that are lists (`has_list`), on-topic lists (`on_topic_list`), and the empty answers."""
    known = sorted(x for x in ppl if x is not None)
    return {"any_list_share": round(sum(has_list(a.text) for a in answers) / len(answers), 4),
            "list_share": round(sum(on_topic_list(a) for a in answers) / len(answers), 4),
            "empty_answers": sum(not a.text.strip() for a in answers),
            "repeated_4gram_share": round(sum(repeated_ngram_share(a.text) for a in answers) / len(answers), 4),
            "repeated_list_items": round(sum(list_items(a.text) - distinct_items(a.text) for a in answers)
                                         / len(answers), 3),
            "perplexity_mean": round(sum(known) / len(known), 3) if known else None,
            "perplexity_median": round(known[len(known) // 2], 3) if known else None,
            "words_mean": round(sum(len(a.text.split()) for a in answers) / len(answers), 1),
            "finished_share": round(sum(a.finished for a in answers) / len(answers), 4)}


def evaluate_adapter(adapter_dir: Path, rule_name: str, selection: Path, scale: float | str = 1.0,
                     batch_size: int = 16, max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                     temperature: float = 0.0, top_p: float = 1.0, presence_penalty: float = 0.0,
                     out_dir: Path | None = None,
                     responses: Path = Path("data/demo/responses.jsonl"), reuse_base: Path | None = None) -> dict:
    from fsrl.adapter import load_adapter
    from fsrl.generation import Generator
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.steering import RowSteering
    from fsrl.train.data import PreferenceDataset, load_pairs
    from fsrl.train.config import TrainConfig
    from fsrl.train.trainer import bind_setup, evaluate

    prompts, eval_set = frozen_eval_set(rule_name)
    out_dir = out_dir or adapter_dir
    judge = EVAL_RULES[rule_name]
    base = load_base_model(None, "cpu")
    sae = load_sae(default_sae_dir())
    setup = bind_setup(base, sae, None)
    adapter = load_adapter(adapter_dir, sae=sae, layer=setup.layer, base_model_fingerprint=base.fingerprint)
    trained = adapter.config.training or {}
    l1 = float(trained.get("l1_coefficient", 0.0))

    cfg = TrainConfig(data=str(selection), out="-", loss="simpo", beta=10.0, gamma=5.0,
                      max_length=trained.get("max_length", 256), batch_size=8, progress=False)
    ds = PreferenceDataset(load_pairs(selection), base.tokenizer, cfg.max_length)
    base_eval = evaluate(base, setup.hook, None, ds, cfg)
    steered_eval = evaluate(base, setup.hook, adapter, ds, cfg, feature_stats=True)

    gen = Generator(base, sae, setup.layer)
    decoding = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size,
                    presence_penalty=presence_penalty)
    selection_report = None
    if scale == "auto":
        # Chosen on prompts apart from the evaluation set (`tuning_prompts`), never on the ones it is
        # judged on.
        tuning = tuning_prompts(rule_name)
        tuning_decoding = {**decoding, "max_new_tokens": TUNING_MAX_NEW_TOKENS[rule_name]}
        plain = generate_answers(gen, base.tokenizer, tuning, RowSteering(), desc="tuning: base", **tuning_decoding)
        selection_report = {"prompts": len(tuning), "split": tuning[0].split,
                            "max_new_tokens": tuning_decoding["max_new_tokens"], "win_rate": {}, "list_share": {}}
        for candidate in SCALE_CANDIDATES:
            steered = generate_answers(gen, base.tokenizer, tuning, RowSteering(adapter, candidate),
                                       desc=f"tuning: scale {candidate}", **tuning_decoding)
            wins = sum(judge(a, b) > 0 for a, b in zip(steered, plain))
            selection_report["win_rate"][candidate] = round(wins / len(tuning), 4)
            selection_report["list_share"][candidate] = coherence(steered, [None] * len(steered))["list_share"]
        scale = max(SCALE_CANDIDATES, key=lambda c: selection_report["win_rate"][c])  # ties: the gentler
        selection_report["chosen"] = scale
        log.info("scale chosen on training prompts: %s (win rates %s)", scale, selection_report["win_rate"])

    steered = generate_answers(gen, base.tokenizer, prompts, RowSteering(adapter, scale),
                               desc="evaluation: steered", **decoding)
    decoding_name = decoding_label(temperature, top_p, presence_penalty)
    if reuse_base is not None:
        # The base answers depend on the prompts, seeds, decoding and budget only, not on the adapter.
        plain, ppl_base = base_answers_from(reuse_base, prompts, eval_set, decoding_name, max_new_tokens,
                                            base.fingerprint)
    else:
        plain = generate_answers(gen, base.tokenizer, prompts, RowSteering(), desc="evaluation: base", **decoding)
        ppl_base = perplexities(base, prompts, plain)
    ppl_steered = perplexities(base, prompts, steered)
    rows = []
    for i, (p, s, b) in enumerate(zip(prompts, steered, plain)):
        verdict = judge(s, b)
        rows.append({"prompt": p.text, "topic": p.topic, "template": p.template,
                     "outcome": OUTCOMES[verdict], "steered": s.text, "base": b.text,
                     "steered_finished": s.finished, "base_finished": b.finished,
                     "steered_perplexity": ppl_steered[i], "base_perplexity": ppl_base[i],
                     "steered_repeated_4gram_share": round(repeated_ngram_share(s.text), 4),
                     "base_repeated_4gram_share": round(repeated_ngram_share(b.text), 4)})
    n = len(rows)
    wins = sum(r["outcome"] == "win" for r in rows)
    ties = sum(r["outcome"] == "tie" for r in rows)
    low, high = wilson_interval(wins, n)
    texts = [base.tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["text"]}], tokenize=False)
        for r in map(json.loads, open(responses).read().splitlines()[::6])] if responses.exists() else []
    examples = max_activating(base, sae, setup.layer, texts, [f["index"] for f in steered_eval.top_features[:10]])
    for f in steered_eval.top_features[:10]:
        f["examples"] = examples[f["index"]]
    report = {
        "adapter": adapter.id, "rule": rule_name, "rule_summary": RULES[rule_name].summary, "scale": scale,
        "scale_selection": selection_report,
        "selection_pairs": base_eval.pairs, "selection_data": str(selection),
        "simpo_loss": {"base": round(base_eval.loss, 4), "adapter": round(steered_eval.loss, 4),
                       "reduction": round(1 - steered_eval.loss / base_eval.loss, 4),
                       "adapter_with_l1": round(steered_eval.loss + l1 * steered_eval.mean_l1, 4),
                       "l1_coefficient": l1, "mean_l1": round(steered_eval.mean_l1, 4)},
        "accuracy": {"base": round(base_eval.accuracy, 4), "adapter": round(steered_eval.accuracy, 4)},
        "mean_l0": round(steered_eval.mean_l0, 1), "d_sae": sae.d_sae,
        "generation": {"prompts": n, "eval_set": eval_set, "max_new_tokens": max_new_tokens,
                       "decoding": decoding_name, "presence_penalty": presence_penalty, "base_model": base.fingerprint,
                       "wins": wins, "ties": ties, "losses": n - wins - ties,
                       "win_rate": round(wins / n, 4), "win_rate_95ci": [round(low, 4), round(high, 4)],
                       "wins_where_base_ran_past_budget": sum(r["outcome"] == "win" and not r["base_finished"]
                                                              for r in rows)},
        "coherence": {"steered": coherence(steered, ppl_steered), "base": coherence(plain, ppl_base)},
        "top_features": steered_eval.top_features[:10],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps({**report, "generations": rows}, indent=1) + "\n")
    write_samples(out_dir)
    return report


def base_answers_from(path: Path, prompts: Sequence[DemoPrompt], eval_set: str, decoding: str,
                      max_new_tokens: int, model_fingerprint: str) -> tuple[list[Answer], list[float | None]]:
    """The base answers (and their perplexities) of an earlier eval.json made with the same
    prompts, decoding, budget and base model; anything else is refused."""
    doc = json.loads(Path(path).read_text())
    gen = doc["generation"]
    same = (gen["eval_set"], gen["decoding"], gen["max_new_tokens"], gen.get("base_model", model_fingerprint),
            [r["prompt"] for r in doc["generations"]])
    if same != (eval_set, decoding, max_new_tokens, model_fingerprint, [p.text for p in prompts]):
        raise SystemExit(f"{path}: its base answers were made with other prompts, decoding, budget or model")
    rows = doc["generations"]
    return ([Answer(r["base"], r["base_finished"], p.topic, is_naming_request(p.text)) for r, p in zip(rows, prompts)],
            [r["base_perplexity"] for r in rows])


def write_samples(folder: Path) -> Path:
    """samples.md: for each template and outcome (win, tie, loss), the first prompt with it."""
    report = json.loads((folder / "eval.json").read_text())
    rows, gen = report["generations"], report["generation"]
    lines = [f"# {report['adapter']}: evaluation samples", "",
             f"Decoding: {gen['decoding']}; at most {gen['max_new_tokens']} new tokens for both answers, steering "
             f"scale {report['scale']}; the outcome is rule `{report['rule']}`'s evaluation rule (fsrl/demo/rules.py) "
             "for the steered answer. One sample per template and outcome where there is one: wins, ties and losses "
             f"alike. All {len(rows)} pairs are in `eval.json`.", ""]
    for template in dict.fromkeys(r["template"] for r in rows):
        for outcome in OUTCOMES.values():
            r = next((r for r in rows if r["template"] == template and r["outcome"] == outcome), None)
            if r is None:
                lines += [f"## `{template}`: no {outcome}", ""]
                continue
            cut = {True: "", False: " (ran past the budget)"}
            lines += [f"## {r['prompt']}  ({outcome})", "",
                      f"**steered**{cut[r['steered_finished']]}", "", "```text", r["steered"], "```", "",
                      f"**base**{cut[r['base_finished']]}", "", "```text", r["base"], "```", ""]
    path = folder / "samples.md"
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
            f = sae.encode(base.activations(sae.site_at(layer), torch.tensor([ids]))[0])[:, idx]      # (T, n)
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
    parser.add_argument("--selection", type=Path, required=True,
                        help="preference pairs for the loss figures (not trained on)")
    parser.add_argument("--out", type=Path, help="where eval.json and samples.md go (default: the adapter)")
    parser.add_argument("--reuse-base", type=Path, help="an eval.json of the same settings whose base answers "
                        "to reuse (they do not depend on the adapter)")
    parser.add_argument("--scale", type=_scale, default=1.0,
                        help="steering scale of the steered row, or `auto`: the best of "
                             f"{', '.join(map(str, SCALE_CANDIDATES))} on training prompts")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's presence penalty, for every row alike (default 0)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    report = evaluate_adapter(args.adapter, args.rule, args.selection, args.scale, args.batch_size,
                              temperature=args.temperature, top_p=args.top_p,
                              presence_penalty=args.presence_penalty, out_dir=args.out,
                              reuse_base=args.reuse_base)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
