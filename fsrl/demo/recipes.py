"""The demo adapters: how each is built, and the README that ships with it.

    python -m fsrl.demo.recipes rebuild concise [--threads 1]   # train + evaluate + README
    python -m fsrl.demo.recipes readme concise                  # README from the files alone

Rebuilding assumes the data is built (`python -m fsrl.demo.build_data generate` then `pairs`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fsrl.demo.rules import RULES

DATA_COMMANDS = (
    "python -m fsrl.demo.build_data generate --out data/demo/responses.jsonl --threads 1",
    "python -m fsrl.demo.build_data pairs --responses data/demo/responses.jsonl --out data/demo",
)


@dataclass(frozen=True)
class Recipe:
    id: str
    rule: str
    train_flags: tuple[str, ...]
    eval_flags: tuple[str, ...] = ()   # how its generations are judged (scale, decoding)
    eval_note: str = ""                # why, when not the defaults

    @property
    def data(self) -> str:
        return f"data/demo/{self.rule}/train.jsonl"

    @property
    def heldout(self) -> str:
        return f"data/demo/{self.rule}/heldout.jsonl"

    def train_argv(self) -> list[str]:
        return ["train", "--data", self.data, "--eval-data", self.heldout, "--out", f"adapters/{self.id}",
                *self.train_flags]

    def train_command(self) -> str:
        return "fsrl " + shlex.join(self.train_argv())

    def eval_command(self) -> str:
        return shlex.join(["python", "-m", "fsrl.demo.evaluate", *self.eval_argv()])

    def eval_argv(self) -> list[str]:
        return ["--adapter", f"adapters/{self.id}", "--rule", self.rule, "--heldout", self.heldout,
                *self.eval_flags]


COMMON = ("--loss", "simpo", "--lr", "1e-4", "--batch-size", "4", "--grad-accum", "2",
          "--max-length", "256", "--epochs", "1", "--seed", "0")
RECIPES: dict[str, Recipe] = {
    "concise": Recipe("concise", "concise", COMMON + ("--l1", "5e-2")),
    "bullets": Recipe(
        "bullets", "bullets", COMMON + ("--l1", "1e-2"),
        eval_flags=("--scale", "auto", "--temperature", "0.7", "--top-p", "0.9"),
        eval_note="Judged with the data's own sampling (temperature 0.7, top-p 0.9) at the steering "
                  "scale that wins most often on training prompts (`--scale auto`; the table "
                  "below). Greedy decoding at scale 1.0 suits this small model badly here: its "
                  "lists collapse into one line repeated, which the rule does not count as a list "
                  "(an earlier adapter of this recipe with L1 5e-2 won 10 % that way, and 64.6 % "
                  "judged as below)."),
}


def write_readme(recipe: Recipe, root: Path = Path(".")) -> Path:
    path = root / "adapters" / recipe.id / "README.md"
    path.write_text(render_readme(recipe, root))
    return path


def render_readme(recipe: Recipe, root: Path = Path(".")) -> str:
    """The adapter's README, from its adapter.json, eval.json and data files alone."""
    folder = root / "adapters" / recipe.id
    meta = json.loads((folder / "adapter.json").read_text())
    t = meta.get("training", {})
    ev = json.loads((folder / "eval.json").read_text())
    rule = RULES[recipe.rule]
    data_counts = {split: sum(1 for _ in open(root / getattr(recipe, attr)))
                   for split, attr in (("train", "data"), ("heldout", "heldout"))}
    loss, gen = ev["simpo_loss"], ev["generation"]
    top = ev["top_features"] or t.get("top_features", [])
    lines = [
        f"# `{recipe.id}`: a demo FSRL adapter that prefers {rule.summary}", "",
        f"Base model {meta['base_model']['name']} (fingerprint {meta['base_model']['fingerprint']}), "
        f"SAE {meta['sae']['name']} (fingerprint {meta['sae']['fingerprint']}, d_sae {meta['d_sae']}) at "
        f"layer {meta['layer']}; activation `{meta['activation']}`.", "",
        "## Figures (held-out prompts: topics never seen in training)", "",
        "| | base model | with this adapter |", "|---|---|---|",
        f"| SimPO loss on {ev['heldout_pairs']} held-out pairs (beta 10, gamma 5) | {loss['base']:.3f} | "
        f"{loss['adapter']:.3f} ({loss['reduction']:.1%} lower) |",
        f"| preference accuracy on the same pairs | {ev['accuracy']['base']:.3f} | {ev['accuracy']['adapter']:.3f} |",
        f"| rule `{rule.name}` prefers it over the other, {gen['prompts']} held-out prompts, "
        f"steering scale {ev['scale']}, {gen['decoding']}, {gen['max_new_tokens']} new tokens "
        f"| - | {gen['win_rate']:.1%} ({gen['wins']} wins, {gen['ties']} ties, {gen['losses']} losses) |",
        f"| mean L0 of v (features steered per token) | 0 | {ev['mean_l0']:.0f} of {ev['d_sae']} |", "",
        f"The demo's targets: SimPO loss at least 30 % lower ({'met' if loss['reduction'] >= 0.3 else 'NOT met'}), "
        f"the rule preferring the steered answer on at least 65 % of held-out prompts "
        f"({'met' if gen['win_rate'] >= 0.65 else 'NOT met'}).", "",
        *([recipe.eval_note, ""] if recipe.eval_note else []),
        *(["| steering scale | " + " | ".join(map(str, sel["win_rate"])) + " |",
           "|---|" + "---|" * len(sel["win_rate"]),
           f"| win rate on {sel['prompts']} training prompts | "
           + " | ".join(f"{w:.0%}" for w in sel["win_rate"].values()) + " |", ""]
          if (sel := ev.get("scale_selection")) else []),
        "Mean over the held-out generations of what the rule reads: "
        + "; ".join(f"{side}: " + ", ".join(f"{k} {v}" for k, v in facts.items())
                    for side, facts in ev["facts_mean"].items()) + ".", "",
        "Features pushed most (mean v over held-out tokens; labels where the SAE has them):", "",
        "| feature | mean v | share of tokens steered | where the SAE fires it most in the demo responses |",
        "|---|---|---|---|",
        *[f"| {f['index']} | {f['mean_v']:+.3f} | {f['active_share']:.2f} | "
          + " / ".join("`" + e.replace("|", "\\|") + "`" for e in f.get("examples", [])) + " |" for f in top[:10]], "",
        "The default SAE ships without feature labels: each feature is shown by the three tokens "
        "(in [brackets], with context) where it fires most over every sixth demo conversation "
        "(chat template included; empty: it never fires there).", "",
        "Samples: `samples.md`; every held-out generation and verdict: `eval.json`.", "",
        "## Data recipe", "",
        f"Prompts: `fsrl/demo/prompts.py` (topics x 4 templates; held-out topics are separate). "
        f"For each prompt the default model wrote two answers (temperature 0.7, top-p 0.9, "
        f"at most 96 new tokens): one to the prompt as written, one to the prompt with the hint "
        f"`{rule.hint.strip()}` appended. The pair is stored under the prompt as written (the hint "
        f"never appears in training) and kept only where the rule prefers one answer; the preferred "
        f"one is `chosen`, whichever it is. Rule `{rule.name}` (`fsrl/demo/rules.py`): {rule.summary}.",
        f"{data_counts['train']} training pairs (`{recipe.data}`), {data_counts['heldout']} held-out "
        f"pairs (`{recipe.heldout}`).", "",
        "## Rebuild", "", "```sh", *DATA_COMMANDS, recipe.train_command(), recipe.eval_command(),
        f"python -m fsrl.demo.recipes readme {recipe.id}", "```", "",
        f"Training: {t.get('steps')} steps of {t.get('effective_batch')} pairs, "
        f"{t.get('train_seconds')} s on {t.get('device')} ({t.get('dtype')}); the full summary is in "
        "`adapter.json` under `training`, the step-by-step log in `train_history.json`.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.demo.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["rebuild", "readme", "command"])
    parser.add_argument("id", choices=sorted(RECIPES))
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.id]
    if args.action == "command":
        print(recipe.train_command())
        return 0
    if args.action == "rebuild":
        threads = ["--threads", str(args.threads)] if args.threads else []
        subprocess.run([sys.executable, "-m", "fsrl.cli", *recipe.train_argv(), *threads], check=True)
        subprocess.run([sys.executable, "-m", "fsrl.demo.evaluate", *recipe.eval_argv(), *threads],
                       check=True)
    from fsrl.demo.evaluate import write_samples
    write_samples(Path("adapters") / recipe.id)
    print(write_readme(recipe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
