"""The judging rules of the demo data: plain text in, a preference out, checkable by hand.

`judge(a, b)` returns +1 if the rule prefers a, -1 if it prefers b, 0 if it has no preference.

concise: "a complete, short answer over a rambling one"
    complete(t)  = t, stripped, ends with . ! or ? (optionally followed by a closing quote,
                   bracket or *) and has at least 4 words
    one complete, the other not        -> the complete one
    neither complete                   -> no preference
    both complete                      -> the one with fewer words, if it has at most 3/4 of
                                          the other's words; else no preference
bullets: "a bulleted or numbered list over a wall of text"
    list_items(t) = lines that start with -, *, •, or 1. / 1) (after spaces) and then text
    distinct(t)   = how many of those items differ (text after the marker, case and
                    punctuation at the ends ignored)
    has_list(t)   = at least 3 distinct items, and at least 3/4 of the items distinct
                    (a list that repeats one line over and over is not a list)
    exactly one has a list             -> that one; else no preference

The rules above built the training pairs. The published evaluation (`fsrl.demo.evaluate`) judges
generated answers with stricter ones (`EVAL_RULES`, fixed before any adapter was evaluated on
the evaluation set), because a generated answer can be cut by the token budget and can drift off
the question:
    finished(a)    the answer ended on its own (end of turn), not at the token budget
    relevant(a, q) it names the question's topic: a word of 4+ letters of the topic appears in
                   it, compared on the first max(4, len - 2) letters ("octopuses" ~ "octopus")
concise-eval: "a finished, complete, on-topic answer that is clearly shorter"
    ok(a) = finished, complete and relevant
    one ok, the other not -> the ok one; neither -> no preference;
    both -> the one with at most 3/4 of the other's words; else no preference
    (so the base answer, given the same budget, loses on length only when it finished too, or
    when it ran past the budget: those wins are counted apart in the report)
bullets-eval: "an on-topic list over no list"
    on_topic_list(a) = has_list and relevant; for a naming request ("Suggest some names for a
                   X", "What should I name my new X?") has_list and no item names X, since a
                   list of names need not say what it names (`naming_list`; from the sixth
                   evaluation set on: the fifth counted such lists as off-topic)
    exactly one answer is an on_topic_list -> that one; else no preference
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

ITEM = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+(\S.*)$", re.MULTILINE)
_END = re.compile(r"[.!?][\"')\]*]*$")


def words(text: str) -> int:
    return len(text.split())


def complete(text: str) -> bool:
    return bool(_END.search(text.strip())) and words(text) >= 4


def list_items(text: str) -> int:
    return len(ITEM.findall(text))


def _distinct(items: list[str]) -> int:
    return len({item.strip().strip(".:;,!*").strip().lower() for item in items})


def distinct_items(text: str) -> int:
    return _distinct(ITEM.findall(text))


def has_list(text: str) -> bool:
    items = ITEM.findall(text)
    distinct = _distinct(items)
    return distinct >= 3 and distinct >= 0.75 * len(items)


def judge_concise(a: str, b: str) -> int:
    ca, cb = complete(a), complete(b)
    if ca != cb:
        return 1 if ca else -1
    if not ca:
        return 0
    wa, wb = words(a), words(b)
    if wa <= 0.75 * wb:
        return 1
    if wb <= 0.75 * wa:
        return -1
    return 0


def judge_bullets(a: str, b: str) -> int:
    la, lb = has_list(a), has_list(b)
    return 0 if la == lb else (1 if la else -1)


def describe_concise(text: str) -> dict:
    return {"words": words(text), "complete": complete(text)}


def describe_bullets(text: str) -> dict:
    return {"list_items": list_items(text), "distinct_items": distinct_items(text), "has_list": has_list(text)}


_WORD = re.compile(r"[a-z]{4,}")


def relevant(text: str, topic: str) -> bool:
    lowered = text.lower()
    return any(word[:max(4, len(word) - 2)] in lowered for word in _WORD.findall(topic.lower()))


_NAMING = re.compile(r"\b(names? for|name ideas|name my|call my)\b", re.IGNORECASE)


def is_naming_request(prompt: str) -> bool:
    """"Suggest some names for a X", "What should I name my new X?": the answer is names."""
    return bool(_NAMING.search(prompt))


def naming_list(text: str, subject: str) -> bool:
    """A list of names for `subject`: a list (`has_list`) no item of which names the subject
    itself ("1. Max / 2. Luna / 3. Rabbit" for a rabbit is not one)."""
    return has_list(text) and not any(relevant(item, subject) for item in ITEM.findall(text))


@dataclass(frozen=True)
class Answer:
    """A generated answer as the evaluation rules read it."""

    text: str
    finished: bool      # ended by the model (end of turn or a stop string), not by the budget
    topic: str          # the question's topic
    naming: bool = False  # the question asks for names (`is_naming_request`)


def on_topic_list(a: Answer) -> bool:
    """A list about the question: names for it when it asks for names, else a list that names it."""
    return naming_list(a.text, a.topic) if a.naming else has_list(a.text) and relevant(a.text, a.topic)


def judge_concise_eval(a: Answer, b: Answer) -> int:
    def ok(x: Answer) -> bool:
        return x.finished and complete(x.text) and relevant(x.text, x.topic)

    oa, ob = ok(a), ok(b)
    if oa != ob:
        return 1 if oa else -1
    if not oa:
        return 0
    wa, wb = words(a.text), words(b.text)
    return 1 if wa <= 0.75 * wb else -1 if wb <= 0.75 * wa else 0


def judge_bullets_eval(a: Answer, b: Answer) -> int:
    la, lb = on_topic_list(a), on_topic_list(b)
    return 0 if la == lb else (1 if la else -1)


EVAL_RULES: dict[str, Callable[[Answer, Answer], int]] = {
    "concise": judge_concise_eval, "bullets": judge_bullets_eval}


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    judge: Callable[[str, str], int]
    describe: Callable[[str], dict]
    hint: str           # appended to the prompt for the second response of each pair


RULES: dict[str, Rule] = {
    "concise": Rule("concise", "a complete, short answer over a rambling one", judge_concise,
                    describe_concise, " Answer in one or two sentences."),
    "bullets": Rule("bullets", "a bulleted or numbered list over a wall of text", judge_bullets,
                    describe_bullets, " Give your answer as a list of 3 to 5 short bullet points."),
}
