"""Build the demo preference data offline: generate responses, then judge pairs by rule.

    python -m fsrl.demo.build_data generate --out data/demo/responses.jsonl [--threads 1]
    python -m fsrl.demo.build_data pairs --responses data/demo/responses.jsonl --out data/demo

`generate` asks the default model each prompt of `prompts.py` three times (temperature 0.7,
top-p 0.9, at most 96 new tokens, a seed per prompt and variant): as written ("plain"), and
with each rule's hint appended to the prompt ("concise", "bullets"). `pairs` then makes, for
each rule, one pair per prompt out of the plain response and that rule's hinted response, stored
under the plain prompt (the hint is never shown in training), and keeps the pair only where the
rule prefers one of the two; the preferred one is `chosen`, whichever it is. Everything the rule
read is written next to each pair, so the labels can be re-checked from the files alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from collections.abc import Callable
from pathlib import Path

from fsrl.corpus import chat_ids
from fsrl.demo.rules import ITEM, RULES, has_list, is_naming_request, naming_list, relevant
from fsrl.prompts import (TEMPLATES, DemoPrompt, demo_prompts, list_selection_prompts, list_train_prompts,
                          name_list_answer)
from fsrl.sampling import SamplingParams

log = logging.getLogger(__name__)

SAMPLING = {"max_new_tokens": 96, "temperature": 0.7, "top_p": 0.9}
VARIANTS = {"plain": "", **{name: rule.hint for name, rule in RULES.items()}}


def seed_for(prompt_id: str, variant: str) -> int:
    return zlib.crc32(f"{prompt_id}/{variant}".encode())


def _answer_all(out: Path, todo: list[tuple[DemoPrompt, str]], prompt_text: Callable[[DemoPrompt, str], str],
                params: Callable[[DemoPrompt, str], SamplingParams], record: Callable[..., dict],
                batch_size: int, limit: int | None) -> Path:
    """Answer each (prompt, variant) of todo not yet in out with the default model, in batches,
    appending one JSON line each (`record(prompt, variant, result, params)`), so a rerun resumes."""
    from tqdm.auto import tqdm

    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import load_base_model
    from fsrl.sae import random_sae
    from fsrl.steering import RowSteering

    done = set()
    if out.exists():
        done = {(r["prompt_id"], r["variant"]) for r in map(json.loads, out.read_text().splitlines())}
    todo = [(p, v) for p, v in todo if (p.id, v) not in done][:limit]
    base = load_base_model(None, "cpu")
    # Nothing is steered here; the generator only needs some SAE to attach its (idle) hook.
    gen = Generator(base, random_sae(base.d_model, 8, layer=0), 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh, tqdm(total=len(todo), desc="generating", unit="response") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            requests = [GenerationRequest(chat_ids(base.tokenizer, prompt_text(p, v)), RowSteering(), params(p, v))
                        for p, v in chunk]
            for (p, v), r in zip(chunk, gen.generate(requests)):
                fh.write(json.dumps(record(p, v, r, params(p, v))) + "\n")
            fh.flush()
            bar.update(len(chunk))
    return out


def generate(out: Path, batch_size: int = 32, limit: int | None = None) -> Path:
    """Generate the three responses of every prompt; appends, so a rerun resumes."""
    def record(p: DemoPrompt, v: str, r, sp: SamplingParams) -> dict:
        return {"prompt_id": p.id, "topic": p.topic, "split": p.split, "prompt": p.text, "variant": v,
                "hint": VARIANTS[v], "text": r.text.strip(), "finish_reason": r.finish_reason,
                "tokens": r.completion_tokens, "seed": sp.seed, **SAMPLING}

    return _answer_all(out, [(p, v) for p in demo_prompts() for v in VARIANTS], lambda p, v: p.text + VARIANTS[v],
                       lambda p, v: SamplingParams(seed=seed_for(p.id, v), **SAMPLING), record, batch_size, limit)


# `bullets`' data (the second recipe on): lists the model writes when asked for one, long enough to
# end on their own, judged against what it writes unasked, the lists it botches, and the same
# lists cut short.
LIST_SAMPLES = {"greedy": {"temperature": 0.0, "top_p": 1.0},
                "s0": {"temperature": 0.7, "top_p": 0.9}, "s1": {"temperature": 0.7, "top_p": 0.9}}
LIST_MAX_NEW_TOKENS = 192
PLAIN_MAX_NEW_TOKENS = 128


def generate_lists(out: Path, batch_size: int = 32, limit: int | None = None) -> Path:
    """For every prompt of `bullets`' training and selection sets: the hinted answer greedily and
    twice sampled (at most 192 new tokens), and the plain answer greedily (128) where
    data/demo/responses.jsonl has none (prompts not made from `TEMPLATES`). Appends, so a rerun
    resumes."""
    hint = RULES["bullets"].hint
    prompts = list_train_prompts() + list_selection_prompts()
    todo = [(p, f"bullets-{name}") for p in prompts for name in LIST_SAMPLES]
    todo += [(p, "plain-greedy") for p in prompts if p.template not in TEMPLATES]

    def params(p: DemoPrompt, variant: str) -> SamplingParams:
        if variant == "plain-greedy":
            return SamplingParams(max_new_tokens=PLAIN_MAX_NEW_TOKENS, seed=seed_for(p.id, variant))
        return SamplingParams(max_new_tokens=LIST_MAX_NEW_TOKENS, seed=seed_for(p.id, variant),
                              **LIST_SAMPLES[variant.removeprefix("bullets-")])

    def record(p: DemoPrompt, v: str, r, sp: SamplingParams) -> dict:
        return {"prompt_id": p.id, "topic": p.topic, "split": p.split, "prompt": p.text, "variant": v,
                "text": r.text.strip(), "finished": r.finish_reason != "length", "tokens": r.completion_tokens,
                "seed": sp.seed, "temperature": sp.temperature, "top_p": sp.top_p,
                "max_new_tokens": sp.max_new_tokens}

    return _answer_all(out, todo, lambda p, v: p.text + ("" if v == "plain-greedy" else hint), params, record,
                       batch_size, limit)


def cut_list(text: str, items: int) -> str:
    """The text up to the end of its first `items` list items: the same list, stopped short."""
    ends = [m.end() for m in ITEM.finditer(text)]
    return text[:ends[items - 1]]


def _every_item_saying(text: str, said: str, skip_first: bool) -> str:
    """The list with its items' text replaced by `said` (markers and the text around kept)."""
    pieces, at = [], 0
    for item in list(ITEM.finditer(text))[1 if skip_first else 0:]:
        pieces += [text[at:item.start(1)], said]
        at = item.end(1)
    return "".join(pieces) + text[at:]


def repeat_first_item(text: str) -> str:
    """The same list with every item after the first saying the first item again (markers and
    the text around the list kept): the list that names one thing over and over."""
    return _every_item_saying(text, ITEM.search(text).group(1), skip_first=True)


def name_the_subject(text: str, subject: str) -> str:
    """The list with every item saying the subject ("1. Rabbit / 2. Rabbit / 3. Rabbit")."""
    return _every_item_saying(text, subject[:1].upper() + subject[1:], skip_first=False)


def make_list_pairs(lists: Path, responses: Path, out_dir: Path) -> dict[str, int]:
    """`bullets`' pairs, per prompt: chosen = the first of its hinted answers (greedy, s0, s1) that
    is a finished, on-topic list (`has_list`); rejected = its plain answer (the greedy one of
    `lists`, else the sampled one of `responses`) when that is no list; in a second pair, its
    first hinted answer that is no list (one item said over and over, say) when there is one; and
    in a third, the chosen list cut after its first item or its first two (by the prompt's seed),
    so that stopping a list short is learned as a loss; in a fourth, the chosen list with its first
    item repeated in place of every other ("1. Goldfish / 2. Goldfish / 3. Goldfish"), so that a
    list of one thing loses to a list of several. A naming request (`is_naming_request`) is
    answered by its names from `NAME_LISTS`, written by hand, and the model's own hinted lists that
    are not lists of names (`naming_list`: they say the subject, or one name over and over) join
    its rejected answers, with a fifth pair of every item saying the subject ("1. Rabbit / 2. Rabbit
    / 3. Rabbit"). Stored under the plain prompt; written to <out_dir>/bullets/{train,heldout}.jsonl."""
    by_prompt: dict[str, dict[str, dict]] = {}
    for path in (responses, lists):
        for row in map(json.loads, path.read_text().splitlines()):
            if row["variant"] in ("plain", "plain-greedy") or row["variant"].startswith("bullets-"):
                by_prompt.setdefault(row["prompt_id"], {})[row["variant"]] = row
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    for pid, variants in sorted(by_prompt.items()):
        hinted = [variants[f"bullets-{n}"] for n in LIST_SAMPLES if f"bullets-{n}" in variants]
        plain = variants.get("plain-greedy") or variants.get("plain")
        if not hinted or plain is None:
            continue
        naming = is_naming_request(plain["prompt"])
        if naming:
            chosen = {**plain, "text": name_list_answer(plain["prompt"]), "variant": "names", "finished": True}
            misses = [h for h in hinted if not naming_list(h["text"], h["topic"])][:2]
        else:
            good = [h for h in hinted if h["finished"] and has_list(h["text"]) and relevant(h["text"], h["topic"])]
            if not good:
                continue
            chosen, misses = good[0], [h for h in hinted if not has_list(h["text"])][:1]
        rejected = ([plain] if not has_list(plain["text"]) else []) + misses
        short = 1 + seed_for(pid, "cut") % 2
        rejected.append({**chosen, "text": cut_list(chosen["text"], short), "variant": f"{chosen['variant']}-cut{short}"})
        rejected.append({**chosen, "text": repeat_first_item(chosen["text"]), "variant": f"{chosen['variant']}-repeat"})
        if naming:
            rejected.append({**chosen, "text": name_the_subject(chosen["text"], chosen["topic"]),
                             "variant": f"{chosen['variant']}-subject"})
        for k, r in enumerate(rejected):
            rows[chosen["split"]].append({
                "prompt": chosen["prompt"], "chosen": chosen["text"], "rejected": r["text"],
                "id": f"{pid}-{k}", "topic": chosen["topic"], "rule": "bullets",
                "chosen_variant": chosen["variant"], "rejected_variant": r["variant"],
                "chosen_facts": RULES["bullets"].describe(chosen["text"]),
                "rejected_facts": RULES["bullets"].describe(r["text"])})
    counts = {}
    for split, items in rows.items():
        path = out_dir / "bullets" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        counts[split] = len(items)
    return counts


def make_pairs(responses: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Judge (plain, hinted) per prompt and rule; write <out_dir>/<rule>/{train,heldout}.jsonl."""
    by_prompt: dict[str, dict[str, dict]] = {}
    for row in map(json.loads, responses.read_text().splitlines()):
        by_prompt.setdefault(row["prompt_id"], {})[row["variant"]] = row
    counts: dict[str, dict[str, int]] = {}
    for name, rule in RULES.items():
        rows: dict[str, list[dict]] = {"train": [], "heldout": []}
        seen = {"train": 0, "heldout": 0}
        for pid, variants in sorted(by_prompt.items()):
            if "plain" not in variants or name not in variants:
                continue
            plain, hinted = variants["plain"], variants[name]
            seen[plain["split"]] += 1
            verdict = rule.judge(plain["text"], hinted["text"])
            if verdict == 0:
                continue
            chosen, rejected = (plain, hinted) if verdict > 0 else (hinted, plain)
            rows[plain["split"]].append({
                "prompt": plain["prompt"], "chosen": chosen["text"], "rejected": rejected["text"],
                "id": pid, "topic": plain["topic"], "rule": name,
                "chosen_variant": chosen["variant"], "rejected_variant": rejected["variant"],
                "chosen_facts": rule.describe(chosen["text"]),
                "rejected_facts": rule.describe(rejected["text"])})
        counts[name] = {}
        for split, items in rows.items():
            path = out_dir / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in items))
            counts[name][split] = len(items)
            counts[name][f"{split}_prompts"] = seen[split]
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.demo.build_data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, out, help_ in (("generate", "data/demo/responses.jsonl", "generate the responses (default model, CPU)"),
                             ("lists", "data/demo/lists.jsonl", "generate bullets' list answers (default model, CPU)")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("--out", type=Path, default=Path(out))
        g.add_argument("--batch-size", type=int, default=32)
        g.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a shared machine)")
        g.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    p = sub.add_parser("pairs", help="judge the responses into preference pairs")
    p.add_argument("--responses", type=Path, default=Path("data/demo/responses.jsonl"))
    p.add_argument("--out", type=Path, default=Path("data/demo"))
    p2 = sub.add_parser("list-pairs", help="judge bullets' list answers into preference pairs")
    p2.add_argument("--lists", type=Path, default=Path("data/demo/lists.jsonl"))
    p2.add_argument("--responses", type=Path, default=Path("data/demo/responses.jsonl"))
    p2.add_argument("--out", type=Path, default=Path("data/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd in ("generate", "lists"):
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        build = generate if args.cmd == "generate" else generate_lists
        print(f"wrote {build(args.out, args.batch_size, limit=args.limit)}")
    elif args.cmd == "list-pairs":
        c = make_list_pairs(args.lists, args.responses, args.out)
        print(f"bullets: {c['train']} train pairs, {c['heldout']} held-out pairs")
    else:
        for rule, c in make_pairs(args.responses, args.out).items():
            print(f"{rule}: {c['train']} train pairs of {c['train_prompts']} prompts, "
                  f"{c['heldout']} held-out pairs of {c['heldout_prompts']} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
