"""`fsrl eval`: does a demo adapter beat simply asking the model?

    fsrl eval --adapter adapters/concise --rule concise --train data/demo/concise/train.jsonl
              [--out DIR] [--judge-url URL --judge-model M] [--limit N]

On the rule's frozen evaluation prompts (`fsrl.prompts.frozen_eval_set`, digest checked) and the
rules and decoding of `python -m fsrl.demo.evaluate` (greedy, 256 new tokens, a seed per
prompt), six arms answer every prompt:

    base         the plain prompt, no steering (what every other arm is judged against)
    prompt       the base model, with the instruction the preference data was built with
                 appended to the prompt (`RULES[rule].hint`: " Answer in one or two sentences.")
    adapter      the adapter at scale 1, at 0.5 and at 2
    contrast     a constant adapter (no training) pushing the 16 features that most tell the
                 training pairs' chosen answers from their rejected ones apart (fsrl.contrast)

Each arm's answers are judged against the base answers by the rule's evaluation judge
(`EVAL_RULES`): wins, ties, losses, the win rate with its 95 % Wilson interval, and coherence
(repeated 4-grams, repeated list items, perplexity under the base model given the plain
prompt, words, finished share). With `--judge-url`/`--judge-model`, an LLM on any
OpenAI-compatible endpoint also judges each arm against base (order alternated by prompt).
Writes `against_prompt.json` and the table in markdown (`against_prompt.md`) into --out
(default: the adapter folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fsrl.errors import FsrlError

log = logging.getLogger(__name__)

CONTRAST_TOP = 16
ADAPTER_SCALES = (1.0, 0.5, 2.0)
JUDGE_PROMPT = ("Which answer to the user's request better meets this criterion: {criterion}? Answer with the "
                "single letter A or B.\n\nRequest: {prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", type=Path, required=True, help="a demo adapter folder")
    parser.add_argument("--rule", required=True, help="the adapter's rule: concise or bullets")
    parser.add_argument("--train", type=Path, required=True,
                        help="its training pairs (JSON Lines): the contrast arm reads their chosen and rejected answers")
    parser.add_argument("--out", type=Path, help="where against_prompt.json/.md go (default: the adapter folder)")
    parser.add_argument("--limit", type=int, help="the first N evaluation prompts only (a quick look, not a figure)")
    parser.add_argument("--pairs", type=int, help="the first N training pairs only, for the contrast (a quick look)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's presence penalty, for every arm alike (bullets' README says which it used)")
    parser.add_argument("--judge-url", help="an OpenAI-compatible API also judges each arm against base")
    parser.add_argument("--judge-model", help="the model to ask, with --judge-url (key: $FSRL_JUDGE_KEY or $OPENAI_API_KEY)")


def llm_judge(url: str, model: str, criterion: str, api_key: str | None = None,
              timeout_s: float = 60.0) -> Callable[[str, str, str, bool], int | None]:
    """A judge on an OpenAI-compatible endpoint: judge(prompt, steered, base, steered_first) ->
    1 (steered better), -1 (base better), None (no verdict). Asked through
    `fsrl.features.labels.ask_chat` (the openai client, retries with backoff, a failure logged
    with its cause)."""
    from fsrl.features.labels import ask_chat

    def judge(prompt: str, steered: str, base: str, steered_first: bool) -> int | None:
        a, b = (steered, base) if steered_first else (base, steered)
        answer = ask_chat(url, model, [{"role": "user", "content": JUDGE_PROMPT.format(
            criterion=criterion, prompt=prompt, a=a, b=b)}], api_key, max_tokens=4, timeout_s=timeout_s)
        letter = (answer or "").strip().upper()[:1]
        if letter not in ("A", "B"):
            return None
        return 1 if (letter == "A") == steered_first else -1
    return judge


def head_to_head(report: dict[str, Any], arm: str, other: str = "prompt") -> dict[str, Any]:
    """`arm` against `other` on the same prompts, each read by its own verdict against base (win
    over tie over loss): on how many prompts each did better, on how many the same, and the exact
    two-sided sign test's p-value of the split (ties left out). Paired, so it can tell apart two
    arms whose win-rate intervals against base overlap."""
    from scipy.stats import binomtest

    rank = {"win": 1, "tie": 0, "loss": -1}
    verdicts: dict[str, dict[str, int]] = {}
    for row in report["generations"]:
        verdicts.setdefault(row["prompt"], {})[row["arm"]] = rank[row["outcome"]]
    pairs = [(v[arm], v[other]) for v in verdicts.values() if arm in v and other in v]
    better = sum(a > b for a, b in pairs)
    worse = sum(a < b for a, b in pairs)
    p = binomtest(better, better + worse).pvalue if better + worse else 1.0
    return {"better": better, "worse": worse, "same": len(pairs) - better - worse, "p": round(float(p), 4)}


def table(report: dict[str, Any]) -> str:
    """The arms as a markdown table (what the demo adapters' READMEs show)."""
    lists = "list_share" in report["arms"]["base"]["coherence"]   # reports made since bullets' second recipe
    any_lists = "any_list_share" in report["arms"]["base"]["coherence"]   # and since its third
    judged = bool(report.get("judge"))
    header = ["arm", "wins", "ties", "losses", "win rate [95 % CI]",
              *(["lists"] if any_lists else []), *(["on-topic lists", "empty"] if lists else []),
              "words", "repeated 4-grams", "perplexity (median)", "finished", *(["LLM judge win rate"] if judged else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, arm in report["arms"].items():
        c = arm["coherence"]
        if name == "base":
            cells = ["–", "–", "–", "(the reference)"]
        else:
            low, high = arm["win_rate_95ci"]
            cells = [str(arm["wins"]), str(arm["ties"]), str(arm["losses"]),
                     f"{arm['win_rate']:.1%} [{low:.1%}–{high:.1%}]"]
        row = [f"`{name}`", *cells, *([f"{c['any_list_share']:.1%}"] if any_lists else []),
               *([f"{c['list_share']:.1%}", str(c["empty_answers"])] if lists else []),
               f"{c['words_mean']}", f"{c['repeated_4gram_share']:.3f}",
               f"{c['perplexity_median']}", f"{c['finished_share']:.0%}"]
        if judged:
            j = arm.get("judge")
            row.append(f"{j['win_rate']:.1%} of {j['verdicts']}" if j and j["verdicts"] else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fsrl.adapter import constant_adapter, load_adapter
    from fsrl.contrast import constant_push, contrast, text_features, text_token_ids
    from fsrl.demo.evaluate import (OUTCOMES, coherence, decoding_label, generate_answers, perplexities,
                                    wilson_interval)
    from fsrl.prompts import DemoPrompt, frozen_eval_set
    from fsrl.demo.rules import EVAL_RULES, RULES
    from fsrl.generation import Generator
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.steering import RowSteering
    from fsrl.train.data import load_pairs

    if args.rule not in EVAL_RULES:
        raise FsrlError(f"--rule: expected one of {', '.join(EVAL_RULES)}")
    if args.judge_url and not args.judge_model:
        raise FsrlError("--judge-url needs --judge-model")
    every_prompt, eval_set = frozen_eval_set(args.rule)
    rule, judge = RULES[args.rule], EVAL_RULES[args.rule]
    base = load_base_model(None, "cpu")
    sae = load_sae(default_sae_dir())
    site = sae.site_at()
    adapter = load_adapter(args.adapter, sae=sae, layer=site.layer, base_model_fingerprint=base.fingerprint)

    # The contrast arm: chosen vs rejected answers of the training pairs, each in its conversation.
    pairs = load_pairs(args.train, limit=args.pairs)
    chosen = text_features(base, sae, site, [text_token_ids(base.tokenizer, [*p.prompt, *p.chosen]) for p in pairs])
    rejected = text_features(base, sae, site, [text_token_ids(base.tokenizer, [*p.prompt, *p.rejected]) for p in pairs])
    found = contrast(chosen, rejected, CONTRAST_TOP)
    pushed = constant_adapter(f"{adapter.id}-contrast", sae, base.name, base.fingerprint, site.layer,
                              constant_push(found, CONTRAST_TOP), {"kind": "contrast", "a": "chosen", "b": "rejected",
                                                                   "data": str(args.train)})

    prompts = every_prompt[:args.limit] if args.limit else every_prompt
    hinted = [DemoPrompt(p.id, p.topic, p.text + rule.hint, p.split, p.template) for p in prompts]
    gen = Generator(base, sae, site.layer)
    decoding = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, batch_size=args.batch_size,
                    presence_penalty=args.presence_penalty)
    arms: dict[str, tuple[Sequence[DemoPrompt], RowSteering]] = {
        "base": (prompts, RowSteering()), "prompt": (hinted, RowSteering()),
        **{f"adapter x{s:g}": (prompts, RowSteering(adapter, s)) for s in ADAPTER_SCALES},
        "contrast": (prompts, RowSteering(pushed, 1.0))}
    answers = {name: generate_answers(gen, base.tokenizer, asked, steering, desc=name, **decoding)
               for name, (asked, steering) in arms.items()}
    llm = None
    if args.judge_url:
        import os
        llm = llm_judge(args.judge_url, args.judge_model, rule.summary, os.environ.get("FSRL_JUDGE_KEY"))
    report: dict[str, Any] = {
        "adapter": adapter.id, "rule": args.rule, "rule_summary": rule.summary, "instruction": rule.hint.strip(),
        "eval_set": eval_set, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "decoding": decoding_label(0.0, 1.0, args.presence_penalty), "presence_penalty": args.presence_penalty,
        "base_model": base.fingerprint,
        "contrast": {"pairs": len(pairs), "top": CONTRAST_TOP, "features": [f.to_json() for f in found]},
        "judge": {"url": args.judge_url, "model": args.judge_model} if args.judge_url else None, "arms": {}}
    rows = []
    for name, given in answers.items():
        ppl = perplexities(base, prompts, given)  # given the plain prompt, for every arm alike
        arm: dict[str, Any] = {"coherence": coherence(given, ppl)}
        if name != "base":
            verdicts = [judge(s, b) for s, b in zip(given, answers["base"])]
            wins, ties = verdicts.count(1), verdicts.count(0)
            low, high = wilson_interval(wins, len(verdicts))
            arm.update(wins=wins, ties=ties, losses=len(verdicts) - wins - ties,
                       win_rate=round(wins / len(verdicts), 4), win_rate_95ci=[round(low, 4), round(high, 4)])
            if llm is not None:
                order = random.Random(0)
                said = [llm(p.text, s.text, b.text, order.random() < 0.5)
                        for p, s, b in zip(prompts, given, answers["base"])]
                known = [v for v in said if v is not None]
                arm["judge"] = {"verdicts": len(known), "wins": known.count(1),
                                "win_rate": round(known.count(1) / len(known), 4) if known else None}
            for p, s, b, v in zip(prompts, given, answers["base"], verdicts):
                rows.append({"arm": name, "prompt": p.text, "template": p.template,
                             "outcome": OUTCOMES[v], "answer": s.text, "base": b.text})
        report["arms"][name] = arm
    out = args.out or args.adapter
    out.mkdir(parents=True, exist_ok=True)
    (out / "against_prompt.json").write_text(json.dumps({**report, "generations": rows}, indent=1) + "\n")
    rendered = table(report)
    (out / "against_prompt.md").write_text(rendered + "\n")
    print(rendered)
    return 0
