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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_ITEM = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+(\S.*)$", re.MULTILINE)
_END = re.compile(r"[.!?][\"')\]*]*$")


def words(text: str) -> int:
    return len(text.split())


def complete(text: str) -> bool:
    return bool(_END.search(text.strip())) and words(text) >= 4


def list_items(text: str) -> int:
    return len(_ITEM.findall(text))


def _distinct(items: list[str]) -> int:
    return len({item.strip().strip(".:;,!*").strip().lower() for item in items})


def distinct_items(text: str) -> int:
    return _distinct(_ITEM.findall(text))


def has_list(text: str) -> bool:
    items = _ITEM.findall(text)
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
