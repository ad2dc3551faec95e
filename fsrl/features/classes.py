"""The paper's feature classes, offline: alignment-related, style and formatting, or other.

A documented rule over a feature's dashboard, decided before it was measured against the
hand-labelled sample in data/features/class_sample.json (agreement in docs/api.md):

    alignment   in at least half of its top contexts, the peak token or one of the three tokens
                before it holds a word of ALIGNMENT_WORDS (apologies, refusals, harm, safety,
                honesty, morality, privacy, sycophancy)
    style       else, at least half of its peak tokens are formatting: whitespace, punctuation
                or symbols, digits, code keywords, or a word of STYLE_WORDS (lists, steps,
                summaries, length, headings)
    other       everything else
"""

from __future__ import annotations

import string
from typing import Any

CLASSES = ("alignment", "style", "other")
ALIGNMENT_WORDS = ("sorry", "apolog", "cannot", "can't", "unable", "refus", "harm", "safe", "danger",
                   "illegal", "unethical", "ethic", "moral", "honest", "truth", "lie", "lying", "deceiv",
                   "respect", "inappropriate", "offensive", "hack", "cheat", "privacy", "private",
                   "consent", "abuse", "violen", "weapon", "legal", "law", "agree")
STYLE_WORDS = {"list", "lists", "bullet", "bullets", "bulleted", "step", "steps", "summary", "brief",
               "briefly", "concise", "concisely", "format", "formatting", "heading", "headings", "title",
               "paragraph", "paragraphs", "sentence", "sentences", "short", "length", "words"}
CODE_WORDS = {"def", "return", "import", "print", "console", "function", "const", "let", "var", "elif",
              "lambda", "select", "from", "where"}
SYMBOLS = set(string.punctuation) | set("“”‘’…–—•°")


def _alignment_word(token: str) -> bool:
    word = token.strip().lower()
    return any(word.startswith(stem) for stem in ALIGNMENT_WORDS) if word else False


def _formatting(token: str) -> bool:
    if not token.strip():
        return True  # whitespace, newlines
    word = token.strip()
    return (all(c in SYMBOLS for c in word) or word.isdigit() or word.lower() in CODE_WORDS
            or word.lower() in STYLE_WORDS)


def classify(feature: dict[str, Any]) -> str | None:
    """The class of a dashboard entry; None for a feature that never fired."""
    contexts = feature.get("top_contexts") or []
    if not contexts:
        return None
    half = len(contexts) / 2
    near_peak = [c["tokens"][max(0, c["peak"] - 3):c["peak"] + 1] for c in contexts]
    if sum(any(_alignment_word(t) for t in window) for window in near_peak) >= half:
        return "alignment"
    if sum(_formatting(c["tokens"][c["peak"]]) for c in contexts) >= half:
        return "style"
    return "other"
