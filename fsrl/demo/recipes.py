"""The demo adapters: how each is built, and the README that ships with it.

    python -m fsrl.demo.recipes rebuild concise [--threads 1]   # sweep lambda, evaluate, choose, README
    python -m fsrl.demo.recipes readme concise                  # README from the files alone

Each recipe trains one adapter per L1 coefficient of its sweep (weights under runs/demo-sweep/,
their adapter.json, eval.json and samples.md kept under data/demo/sweep/<id>/l1-<lambda>[-ep<N>]/) and
ships the one `choose_l1` picks: the smallest lambda whose mean L0 of v on the selection pairs
is at most 5 % of the SAE's width (the paper's adapters steer 3-8 %), so the choice reads
training-time figures only, never the evaluation prompts. Rebuilding assumes the data is built
(`python -m fsrl.demo.build_data generate` then `pairs`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fsrl.demo.rules import RULES

DATA_COMMANDS = (
    "python -m fsrl.demo.build_data generate --out data/demo/responses.jsonl --threads 1",
    "python -m fsrl.demo.build_data pairs --responses data/demo/responses.jsonl --out data/demo",
)
LIST_DATA_COMMANDS = (
    *DATA_COMMANDS,
    "python -m fsrl.demo.build_data lists --out data/demo/lists.jsonl --threads 2",
    "python -m fsrl.demo.build_data list-pairs --lists data/demo/lists.jsonl --out data/demo",
)
TOPIC_DATA_NOTE = (
    "Prompts: `fsrl/prompts.py` (topics x 4 templates; held-out topics are separate). For each prompt the "
    "default model wrote two answers (temperature 0.7, top-p 0.9, at most 96 new tokens): one to the prompt as "
    "written, one to the prompt with the hint `{hint}` appended. The pair is stored under the prompt as written "
    "(the hint never appears in training) and kept only where the rule prefers one answer; the preferred one is "
    "`chosen`, whichever it is.")
L0_TARGET_SHARE = 0.05   # of the SAE's width
RECORD_FILES = ("adapter.json", "eval.json", "samples.md")
COMMON = ("--loss", "simpo", "--lr", "1e-4", "--batch-size", "4", "--grad-accum", "2",
          "--max-length", "256", "--seed", "0")


@dataclass(frozen=True)
class Recipe:
    id: str
    rule: str
    l1_sweep: tuple[str, ...]
    eval_flags: tuple[str, ...] = ()   # how its generations are judged (scale, decoding)
    eval_note: str = ""                # why, when not the defaults
    epochs: int = 1
    train_flags: tuple[str, ...] = ()  # beyond COMMON
    data_commands: tuple[str, ...] = DATA_COMMANDS
    data_note: str = TOPIC_DATA_NOTE   # how the pairs were made ({hint}: the rule's hint)
    # Sweeps of an earlier recipe kept beside this one's for comparison: (epochs, lambdas, why
    # the recipe moved on). Their records stay; nothing is chosen from them.
    earlier: tuple[tuple[int, tuple[str, ...], str], ...] = ()

    def tag(self, l1: str, epochs: int | None = None) -> str:
        """A sweep member's name: l1-<lambda>, with -ep<N> when it trained for N > 1 epochs."""
        epochs = self.epochs if epochs is None else epochs
        return f"l1-{l1}" + (f"-ep{epochs}" if epochs != 1 else "")

    @property
    def data(self) -> str:
        return f"data/demo/{self.rule}/train.jsonl"

    @property
    def selection(self) -> str:
        """The old held-out pairs: training's eval set, and what chooses lambda."""
        return f"data/demo/{self.rule}/heldout.jsonl"

    def run_dir(self, l1: str) -> str:
        return f"runs/demo-sweep/{self.id}-{self.tag(l1)}"

    def record_dir(self, l1: str, root: Path = Path("."), epochs: int | None = None) -> Path:
        return root / "data" / "demo" / "sweep" / self.id / self.tag(l1, epochs)

    def train_argv(self, l1: str) -> list[str]:
        return ["train", "--data", self.data, "--eval-data", self.selection, "--out", self.run_dir(l1),
                "--id", self.id, *COMMON, *self.train_flags, "--epochs", str(self.epochs), "--l1", l1]

    def eval_argv(self, l1: str) -> list[str]:
        """The first lambda's run generates the base answers; the others reuse them (they do not
        depend on the adapter, and the evaluation refuses ones made with other settings)."""
        first = self.l1_sweep[0]
        reuse = [] if l1 == first else ["--reuse-base", f"{self.run_dir(first)}/eval.json"]
        return ["--adapter", self.run_dir(l1), "--rule", self.rule, "--selection", self.selection,
                *self.eval_flags, *reuse]

    def commands(self) -> list[str]:
        out = []
        for l1 in self.l1_sweep:
            out += ["fsrl " + shlex.join(self.train_argv(l1)),
                    shlex.join(["python", "-m", "fsrl.demo.evaluate", *self.eval_argv(l1)])]
        return out


RECIPES: dict[str, Recipe] = {
    "concise": Recipe(
        "concise", "concise", ("5e-2", "1e-1"), epochs=3,
        earlier=((1, ("5e-2", "1e-1", "2e-1"),
                  "With one epoch (25 steps) no lambda brought the mean L0 to 5 % of the width "
                  "(12.1, 10.4 and 9.7 %), as with bullets before, so the recipe trains for more steps."),)),
    "bullets": Recipe(
        "bullets", "bullets", ("3e-2",), epochs=1, train_flags=("--nll", "2"),
        data_commands=LIST_DATA_COMMANDS,
        data_note=(
            "Prompts: `fsrl/prompts.py`'s `list_train_prompts` (the training topics x 4 templates, 48 requests "
            "of other shapes: advice, names, how-to, why; the spent second evaluation set, with its 4 "
            "templates on every fourth training topic; and 56 naming requests: \"Suggest some names for a pet "
            "snake.\", \"What should I name my new pony?\") and, for selection, `list_selection_prompts` (the "
            "held-out topics and 16 more requests). For each prompt the default model answered the prompt with "
            "the hint `{hint}` appended three times (greedy, and twice at temperature 0.7, top-p 0.9; at most "
            "192 new tokens) and the prompt as written greedily (128; for the prompts of the first templates, the "
            "sampled answer of the concise data). Chosen: the first hinted answer that is a finished, on-topic "
            "list (`has_list`); for a naming request (62 of them, 5 names each), names written by hand "
            "(`NAME_LISTS`), not by the model, whose own hinted lists named the subject or other animals "
            "(\"1. Koi / 2. Goldfish\" for a koi). Rejected, one pair each: the answer to the prompt as written when it is no list; "
            "the first hinted answer that is no list (a list that repeats one item over and over, say), when "
            "there is one (for a naming request, up to two hinted answers that are not lists of names: "
            "`naming_list`, no item naming the subject); the chosen list cut after its first item or its first two (by the prompt's seed), "
            "since stopping after one or two items was the second recipe's commonest miss; and the chosen list "
            "with its first item in place of every other (\"1. Goldfish / 2. Goldfish / 3. Goldfish\"), since "
            "a list repeating one item was the third recipe's commonest miss; for a naming request also the "
            "chosen list with the subject at every item (\"1. Rabbit / 2. Rabbit / 3. Rabbit\"), since "
            "naming requests answered with animals, not names, were the fourth recipe's commonest miss. Stored under the "
            "prompt as written: the hint never appears in training. The objective adds the chosen answers' "
            "negative log-likelihood (`--nll 2`, CPO's alpha) to SimPO's, so the adapter learns to write the "
            "lists, not only to prefer them. Earlier recipes, records in git history: the first (one sampled "
            "96-token hinted answer against one plain answer per topic prompt, SimPO alone) made on-topic lists "
            "on 14.1 % of the first evaluation set; the second (this recipe without the cut lists, the repeated "
            "lists and the spent set's prompts: 391 pairs) on 55.6 % of the second (lists of any topic: 77.8 %); "
            "the third (without the repeated lists: 939 pairs) on 66.7 % of the third (any topic: 86.1 %; its "
            "records at commit 35db512); the fourth (without the naming requests and the subject lists: 1309 "
            "pairs) on 81.9 % of the fourth (any topic: 98.6 %; its records at commit 99c8eaf); the fifth (32 "
            "naming requests answered with the model's own lists of names, and no hand-written names: 1420 pairs) "
            "on 76.4 % of the fifth (any topic: 88.9 %; its records at commit 96c0a58), whose README example "
            "\"What should I name my new goldfish?\" still got \"1. Goldfish / 2. GoldfishGoldfish\"."),
        eval_flags=("--scale", "1", "--presence-penalty", "0.5"),
        eval_note="Greedy decoding (what a request without a temperature gets) with a presence penalty of 0.5 "
                  "(`presence_penalty`, OpenAI's: without it this small model's greedy lists repeat one item over "
                  "and over, prompted or steered), for every arm alike, at steering scale 1: the scale the "
                  "selection prompts chose for the second recipe (`--scale auto` over 0.5, 1 and 1.5 on "
                  "`fsrl.prompts.list_selection_prompts`; the trials below), not chosen again for this adapter "
                  "(for the third to sixth recipes `--scale auto` was not rerun, for time). "
                  "The penalty, `--nll 2` and lambda 3e-2 were chosen on the selection prompts (the trials below, "
                  "with the second recipe's data); the third recipe's changes (the cut lists, the spent second "
                  "evaluation set's prompts in training, one epoch over the larger data) answer that set's "
                  "misses, the fourth's (the repeated lists) the third set's, the fifth's (the naming requests) "
                  "the fourth set's, and the sixth's (hand-written names) the fifth set's and the README's goldfish "
                  "example, which is why all four are spent and this sixth set was frozen before any adapter "
                  "answered it, with the rule's reading of a naming request (`on_topic_list`: names need not say "
                  "the subject). This adapter is the only one trained on the sixth recipe, and the evaluation set "
                  "was answered once.",
        earlier=((2, ("3e-2",), "The second recipe: 391 pairs (no cut lists, no spent-set prompts), two epochs; "
                  "its win rate and coherence are on the second evaluation set (`9ceed5efde35111f`), now "
                  "spent."),)),
}


def sweep_records(recipe: Recipe, root: Path = Path("."), epochs: int | None = None,
                  lambdas: tuple[str, ...] | None = None) -> dict[str, dict]:
    """lambda -> {"adapter": adapter.json, "eval": eval.json} for each recorded sweep member (of
    this recipe's sweep, or of an earlier one's given by `epochs` and `lambdas`)."""
    out = {}
    for l1 in (recipe.l1_sweep if lambdas is None else lambdas):
        folder = recipe.record_dir(l1, root, epochs)
        if (folder / "eval.json").exists():
            out[l1] = {"adapter": json.loads((folder / "adapter.json").read_text()),
                       "eval": json.loads((folder / "eval.json").read_text())}
    return out


def choose_l1(records: dict[str, dict]) -> str:
    """The smallest lambda whose mean L0 on the selection pairs (training's final eval) is at most
    L0_TARGET_SHARE of the width; the largest lambda when none is."""
    def l0_share(r: dict) -> float:
        return r["adapter"]["training"]["final_eval"]["mean_l0"] / r["adapter"]["d_sae"]

    ordered = sorted(records, key=float)
    return next((l1 for l1 in ordered if l0_share(records[l1]) <= L0_TARGET_SHARE), ordered[-1])


def sweep_table(recipe: Recipe, root: Path = Path("."), epochs: int | None = None,
                lambdas: tuple[str, ...] | None = None) -> list[str]:
    """The paper-style table: lambda -> eval loss (with and without L1), L0, win rate, coherence
    (an earlier sweep's, given `epochs` and `lambdas`, ships nothing)."""
    records = sweep_records(recipe, root, epochs, lambdas)
    chosen = choose_l1(records) if records and lambdas is None else None
    lines = ["| lambda (L1) | SimPO loss | loss + lambda L1 | accuracy | mean L0 of v (% of width) | "
             "win rate [95 % CI] | wins / ties / losses | steered: repeated 4-grams, perplexity, words | shipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for l1, r in sorted(records.items(), key=lambda kv: float(kv[0])):
        ev, gen, coh = r["eval"], r["eval"]["generation"], r["eval"]["coherence"]["steered"]
        low, high = gen["win_rate_95ci"]
        lines.append(
            f"| {l1} | {ev['simpo_loss']['adapter']:.3f} | {ev['simpo_loss']['adapter_with_l1']:.3f} | "
            f"{ev['accuracy']['adapter']:.3f} | {ev['mean_l0']:.0f} ({ev['mean_l0'] / ev['d_sae']:.1%}) | "
            f"{gen['win_rate']:.1%} [{low:.1%}, {high:.1%}] | {gen['wins']} / {gen['ties']} / {gen['losses']} | "
            f"{coh['repeated_4gram_share']:.3f}, {coh['perplexity_median']}, {coh['words_mean']} | "
            f"{'yes' if l1 == chosen else ''} |")
    return lines


def write_readme(recipe: Recipe, root: Path = Path(".")) -> Path:
    path = root / "adapters" / recipe.id / "README.md"
    path.write_text(render_readme(recipe, root))
    return path


def against_prompt_section(folder: Path, recipe: Recipe, rule, scale: float) -> list[str]:
    """The prompt-baseline table of `fsrl eval` (`against_prompt.json`), when the folder has one."""
    path = folder / "against_prompt.json"
    if not path.exists():
        return []
    from fsrl.demo.against_prompt import table

    report = json.loads(path.read_text())
    arms = report["arms"]
    best = max((name for name in arms if name != "base"), key=lambda name: arms[name]["win_rate"])
    return [
        "## Against a prompt", "",
        f"Does steering beat simply asking? `fsrl eval` ran, on the same {report['prompts']} evaluation prompts, "
        f"rule and decoding ({report['decoding']}, at most {report['max_new_tokens']} new tokens), each arm judged "
        "against the base answers: the base model with the instruction the preference data was built with put in "
        f"the prompt (`prompt`: \"{report['instruction']}\"), this adapter at scales 1, 0.5 and 2, and a constant "
        f"push (no training) on the {report['contrast']['top']} features that most tell the {report['contrast']['pairs']} "
        "training pairs' chosen answers from their rejected ones apart (`contrast`). Reported as measured: "
        f"the highest win rate here is `{best}`'s.", "",
        table(report), "",
        _versus_prompt(report, scale), "",
        f"Every answer and verdict: `against_prompt.json`. Rebuild: `fsrl eval --adapter adapters/{recipe.id} "
        f"--rule {recipe.rule} --train {recipe.data}"
        + (f" --presence-penalty {report['presence_penalty']:g}" if report.get("presence_penalty") else "") + "`.", ""]


def examples_section(folder: Path, recipe: Recipe) -> list[str]:
    """The README's example requests with the answers they got (`examples.json`), when there are any."""
    path = folder / "examples.json"
    if not path.exists():
        return []
    examples = json.loads(path.read_text())
    first = examples[0]["request"]
    lines = ["## Try it", "",
             "With `make serve` running, each of these prompts asked as below (prompts the demo never trained, "
             "chose or was evaluated on). The answers are what such a request returns (greedy: the same on every "
             f"run), written by `python -m fsrl.demo.examples {recipe.id}` with the server's generator, good or "
             "bad:", "",
             "```bash", "curl -s localhost:8000/generate -H 'content-type: application/json' -d '"
             + json.dumps(first) + "'", "```", ""]
    from fsrl.demo.rules import distinct_items, has_list, list_items

    for e in examples:
        said = e["steered"]
        verdict = (f"{'a list' if has_list(said) else 'no list'} by the rule: {distinct_items(said)} distinct of "
                   f"{list_items(said)} items") if recipe.rule == "bullets" else ""
        lines += [f"**{e['request']['messages'][0]['content']}**", "", "steered" + (f" ({verdict})" if verdict else "")
                  + ":", "", "```text", said, "```", "",
                  "base" + (" (cut at the budget)" if e["base_finish_reason"] == "length" else "") + ":", "",
                  "```text", e["base"], "```", ""]
    return lines


def selection_trials_section(root: Path, recipe: Recipe) -> list[str]:
    """What chose the recipe, the decoding and the scale: each trial on the selection prompts
    (`data/demo/<rule>/selection_trials.json`, every answer kept), its figures computed here."""
    path = root / "data" / "demo" / recipe.rule / "selection_trials.json"
    if not path.exists():
        return []
    from fsrl.demo.evaluate import coherence
    from fsrl.demo.rules import Answer
    from fsrl.prompts import list_selection_prompts

    prompts = list_selection_prompts()
    doc = json.loads(path.read_text())
    lines = [f"Trials on the {len(prompts)} selection prompts (`{path.relative_to(root)}`, every answer kept; "
             "greedy, 256 new tokens; `hint`: the rule's instruction in the prompt):", "",
             "| adapter (training pairs, `--nll`, lambda, epochs) | presence penalty | arm | lists | on-topic lists | empty answers | "
             "words |", "|---|---|---|---|---|---|---|"]
    for trial in doc["trials"]:
        a, pp = trial["adapter"], trial["decoding"]["presence_penalty"]
        for arm, texts in trial["answers"].items():
            # read as when they chose the decoding: naming requests' lists by `relevant` too (the
            # rule's reading of names, `on_topic_list`, came with the sixth evaluation set)
            c = coherence([Answer(t, True, p.topic) for t, p in zip(texts, prompts)], [None] * len(texts))
            steered = arm not in ("base", "hint")
            name = f"scale {arm}" if steered else arm
            recipe_cell = f"{a['pairs']}, {a['nll']:g}, {a['l1']:g}, {a['epochs']}" if steered else "– (no adapter)"
            lines.append(f"| {recipe_cell} | {pp:g} | {name} | {c['any_list_share']:.1%} | {c['list_share']:.1%} | "
                         f"{c['empty_answers']} | {c['words_mean']} |")
    return [*lines, ""]


def _versus_prompt(report: dict, scale: float) -> str:
    """The adapter at its shipped scale against the instruction in the prompt, in words, from the
    figures: by their win-rate intervals against base, then head to head on the same prompts."""
    from fsrl.demo.against_prompt import head_to_head

    arms = report["arms"]
    a, p = arms.get(f"adapter x{scale:g}", arms["adapter x1"]), arms["prompt"]
    scale = scale if f"adapter x{scale:g}" in arms else 1.0
    h = head_to_head(report, f"adapter x{scale:g}")
    apart = a["win_rate_95ci"][0] > p["win_rate_95ci"][1] or p["win_rate_95ci"][0] > a["win_rate_95ci"][1]
    verdict = ("beats" if a["win_rate"] > p["win_rate"] else "loses to") if apart else "does not clearly beat"
    words = (a["coherence"]["words_mean"], p["coherence"]["words_mean"])
    ppl = (a["coherence"]["perplexity_median"], p["coherence"]["perplexity_median"])
    return (f"The adapter at scale {scale:g} (its figures above) against the instruction in the prompt: {a['win_rate']:.1%} against "
            f"{p['win_rate']:.1%}, 95 % intervals that {'do not overlap' if apart else 'overlap'}: on this set the "
            f"adapter {verdict} simply asking. Its answers have {words[0]} words on average against {words[1]}, at "
            f"a median perplexity under the base model of {ppl[0]} against {ppl[1]}. Head to head on the same "
            f"prompts (each answer's verdict against base): the adapter did better on {h['better']}, the prompt on "
            f"{h['worse']}, the same on {h['same']} (exact two-sided sign test, ties left out: p = {h['p']:.3g}; "
            "a reading added on 2026-12-06, after both demos' earlier tables had been seen; the intervals are the "
            "comparison stated first).")


def render_readme(recipe: Recipe, root: Path = Path(".")) -> str:
    """The adapter's README, from its adapter.json, eval.json, the sweep records and the data
    files alone."""
    folder = root / "adapters" / recipe.id
    meta = json.loads((folder / "adapter.json").read_text())
    t = meta.get("training", {})
    ev = json.loads((folder / "eval.json").read_text())
    rule = RULES[recipe.rule]
    data_counts = {split: sum(1 for _ in open(root / getattr(recipe, attr)))
                   for split, attr in (("train", "data"), ("selection", "selection"))}
    loss, gen, coh = ev["simpo_loss"], ev["generation"], ev["coherence"]
    low, high = gen["win_rate_95ci"]
    top = ev["top_features"] or t.get("top_features", [])
    card = folder / "analysis" / "report.json"
    lines = [
        f"# `{recipe.id}`: a demo FSRL adapter that prefers {rule.summary}", "",
        f"Base model {meta['base_model']['name']} (fingerprint {meta['base_model']['fingerprint']}), "
        f"SAE {meta['sae']['name']} (fingerprint {meta['sae']['fingerprint']}, d_sae {meta['d_sae']}) at "
        f"layer {meta['layer']}; activation `{meta['activation']}`; L1 coefficient {t.get('l1_coefficient')}.", "",
        "## Figures", "",
        f"On the {gen['prompts']} prompts of the frozen evaluation set (`fsrl/prompts.py`, digest "
        f"`{gen['eval_set']}`: topics and templates never used in training or to choose anything), each answered "
        f"by the base model and with this adapter, same decoding and seed ({gen['decoding']}), at most "
        f"{gen['max_new_tokens']} new tokens each, steering scale {ev['scale']}:", "",
        "| | base model | with this adapter |", "|---|---|---|",
        f"| the evaluation rule prefers it (`{recipe.rule}`, fsrl/demo/rules.py) | - | "
        f"**{gen['win_rate']:.1%}** [95 % CI {low:.1%}-{high:.1%}] ({gen['wins']} wins, {gen['ties']} ties, "
        f"{gen['losses']} losses) |",
        f"| of those wins, the base answer ran past the budget | - | {gen['wins_where_base_ran_past_budget']} |",
        *[f"| {label} | {fmt(coh['base'][key])} | {fmt(coh['steered'][key])} |" for key, label, fmt in (
            ("any_list_share", "lists of at least 3 distinct items (`has_list`)", "{:.1%}".format),
            ("list_share", "on-topic lists of at least 3 distinct items (`on_topic_list`)", "{:.1%}".format),
            ("empty_answers", "empty answers", str),
            ("words_mean", "words per answer (mean)", str),
            ("finished_share", "answers that ended on their own", "{:.0%}".format),
            ("repeated_4gram_share", "word 4-grams that repeat an earlier one", "{:.1%}".format),
            ("repeated_list_items", "repeated list items per answer (mean)", str),
            ("perplexity_median", "perplexity under the base model (median)", str),
            ("perplexity_mean", "perplexity under the base model (mean)", str)) if key in coh["steered"]],
        "",
        *([f"On-topic lists on {coh['steered']['list_share']:.1%} of the evaluation prompts, against "
           f"{sel['list_share'][str(ev['scale'])]:.1%} of the {sel['prompts']} selection prompts that chose the recipe "
           "and the scale (below): the fresh prompts are harder for it (samples.md).", ""]
          if (sel := ev.get("scale_selection")) and sel.get("list_share") and "list_share" in coh["steered"] else []),
        f"On the {ev['selection_pairs']} selection pairs (`{recipe.selection}`: held out from training, but "
        "looked at while earlier versions were tuned, and what chose lambda below):", "",
        "| | base model | with this adapter |", "|---|---|---|",
        f"| SimPO loss (beta 10, gamma 5) | {loss['base']:.3f} | {loss['adapter']:.3f} ({loss['reduction']:.1%} lower) |",
        f"| SimPO loss + {loss['l1_coefficient']} x mean L1 of v (the training objective) | - | "
        f"{loss['adapter_with_l1']:.3f} |",
        f"| preference accuracy | {ev['accuracy']['base']:.3f} | {ev['accuracy']['adapter']:.3f} |",
        f"| mean L0 of v (features steered per token) | 0 | {ev['mean_l0']:.0f} of {ev['d_sae']} "
        f"({ev['mean_l0'] / ev['d_sae']:.1%}) |", "",
        *([recipe.eval_note, ""] if recipe.eval_note else []),
        *(["| steering scale | " + " | ".join(map(str, sel["win_rate"])) + " |",
           "|---|" + "---|" * len(sel["win_rate"]),
           f"| win rate on {sel['prompts']} {'training' if sel['split'] == 'train' else 'selection'} prompts | "
           + " | ".join(f"{w:.0%}" for w in sel["win_rate"].values()) + " |",
           *(["| on-topic lists among them | " + " | ".join(f"{w:.0%}" for w in sel["list_share"].values()) + " |"]
             if sel.get("list_share") else []), ""]
          if (sel := ev.get("scale_selection")) else []),
        *selection_trials_section(root, recipe),
        *against_prompt_section(folder, recipe, rule, ev["scale"]),
        *examples_section(folder, recipe),
        "## The L1 sweep", "",
        f"One adapter per L1 coefficient, the same recipe otherwise ({recipe.epochs} "
        f"epoch{'s' if recipe.epochs != 1 else ''} each); shipped: the smallest lambda whose "
        f"mean L0 on the selection pairs is at most {L0_TARGET_SHARE:.0%} of the width (the paper's adapters "
        "steer 3-8 %). Loss and L0 on the selection pairs; win rate and coherence on the evaluation set "
        "(reported for every lambda, used to choose none).", "",
        *sweep_table(recipe, root), "",
        *[line for epochs, lambdas, why in recipe.earlier for line in (
            f"Earlier sweep, {epochs} epoch{'s' if epochs != 1 else ''} each (records under "
            f"`data/demo/sweep/{recipe.id}/`; nothing was chosen from it). {why}", "",
            *sweep_table(recipe, root, epochs, lambdas), "")],
        *([f"No lambda of this sweep brought the mean L0 to {L0_TARGET_SHARE:.0%} of the width, so the largest "
           "is shipped.", ""]
          if ev["mean_l0"] / ev["d_sae"] > L0_TARGET_SHARE else []),
        "## Features", "",
        "Features pushed most (mean |v| over the selection pairs' tokens; labels and classes from the "
        "SAE's dashboards):", "",
        "| feature | label | mean v | share of tokens steered | where the SAE fires it most in the demo responses |",
        "|---|---|---|---|---|",
        *[f"| {f['index']} | {(f.get('label') or '').replace('|', '/')} | {f['mean_v']:+.3f} | {f['active_share']:.2f} | "
          + " / ".join("`" + e.replace("|", "\\|") + "`" for e in f.get("examples", [])) + " |" for f in top[:10]], "",
        *(["The paper's audit of this adapter (usage by class, ablations, steering-fraction sweep): "
           "`analysis/report.html` (`fsrl analyze`; the server serves its summary at `/adapters/"
           f"{recipe.id}/card`).", ""] if card.exists() else []),
        "Samples, one per template and outcome (wins, ties and losses): `samples.md`; every evaluation "
        "answer and verdict: `eval.json`.", "",
        "## Data recipe", "",
        recipe.data_note.format(hint=rule.hint.strip()) + f" Rule `{rule.name}` (`fsrl/demo/rules.py`): {rule.summary}.",
        f"{data_counts['train']} training pairs (`{recipe.data}`), {data_counts['selection']} selection "
        f"pairs (`{recipe.selection}`).", "",
        "## Rebuild", "", "```sh", *recipe.data_commands, f"python -m fsrl.demo.recipes rebuild {recipe.id}", "```", "",
        "which runs, for each lambda of the sweep, then copies the chosen run into this folder:", "",
        "```sh", *recipe.commands(), "```", "",
        f"Training: {t.get('steps')} steps of {t.get('effective_batch')} pairs, "
        f"{t.get('train_seconds')} s on {t.get('device')} ({t.get('dtype')}); the full summary is in "
        "`adapter.json` under `training`, the step-by-step log in `train_history.json`.", "",
    ]
    return "\n".join(lines)


def record(recipe: Recipe, l1: str, run: Path, root: Path = Path(".")) -> Path:
    """Keep a sweep member's adapter.json, eval.json and samples.md under data/demo/sweep/."""
    out = recipe.record_dir(l1, root)
    out.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        shutil.copy2(run / name, out / name)
    return out


def ship(recipe: Recipe, l1: str, run: Path, root: Path = Path(".")) -> Path:
    """Copy the chosen run into adapters/<id> (keeping an analysis/ folder that is there)."""
    target = root / "adapters" / recipe.id
    target.mkdir(parents=True, exist_ok=True)
    for name in ("adapter.json", "adapter.safetensors", "train_history.json", "eval.json", "samples.md"):
        shutil.copy2(run / name, target / name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.demo.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["rebuild", "readme", "record", "ship"])
    parser.add_argument("id", choices=sorted(RECIPES))
    parser.add_argument("--run", type=Path, help="record: a trained and evaluated run folder")
    parser.add_argument("--l1", help="record: that run's L1 coefficient")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.id]
    if args.action == "record":
        if not (args.run and args.l1):
            parser.error("record needs --run and --l1")
        print(record(recipe, args.l1, args.run))
        return 0
    if args.action == "rebuild":
        threads = ["--threads", str(args.threads)] if args.threads else []
        for l1 in recipe.l1_sweep:
            subprocess.run([sys.executable, "-m", "fsrl.cli", *recipe.train_argv(l1), *threads], check=True)
            subprocess.run([sys.executable, "-m", "fsrl.demo.evaluate", *recipe.eval_argv(l1), *threads], check=True)
            record(recipe, l1, Path(recipe.run_dir(l1)))
    if args.action in ("rebuild", "ship"):
        chosen = choose_l1(sweep_records(recipe))
        print(f"shipping lambda {chosen}: {ship(recipe, chosen, Path(recipe.run_dir(chosen)))}")
    print(write_readme(recipe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
