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

Optionally an OpenAI-compatible endpoint classifies instead (`fsrl features classify
--labeler-url URL --labeler-model M`): it is shown the feature's label, its top contexts and
the tokens it promotes, and answers one class. Its answers are stored beside the SAE in
`feature_classes.json` ({"<index>": {"class", "source"}}) and take precedence over the rule
for the features they cover (`feature_classes`).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from fsrl.errors import CorruptFileError
from fsrl.features.labels import ask_live_features, context_text

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


CLASSES_FILE = "feature_classes.json"
Classes = dict[int, tuple[str, str]]  # index -> (class, source)
CLASSIFIER_PROMPT = (
    "You sort features of a sparse autoencoder trained on a language model's residual stream into "
    "three classes. alignment: about honesty, harm, refusal, safety, sycophancy, morality, apologies, "
    "privacy or consent. style: about formatting or form: punctuation, capitalisation, whitespace, "
    "lists, code formatting, length, headings, summaries. other: anything else (topics, entities, "
    "grammar, facts). Each example is text on which the feature fires most; the token where it "
    "peaks is in ⟦ ⟧. Reply with one word: alignment, style or other.")


def classifier_messages(feature: dict[str, Any], label: str | None) -> list[dict[str, str]]:
    examples = "\n".join(f"{n}. {context_text(c)}" for n, c in enumerate(feature.get("top_contexts") or [], 1))
    promoted = ", ".join(repr(t) for t, _ in (feature.get("promoted") or [])[:8])
    return [{"role": "system", "content": CLASSIFIER_PROMPT},
            {"role": "user", "content": f"Label: {label or '(none)'}\nExamples:\n{examples}\n\n"
                                        f"Output tokens it promotes: {promoted}\n\nClass:"}]


def parse_class(answer: str) -> str | None:
    """The first class name the answer holds (case-insensitive), else None."""
    words = [w.strip(".,:;*\"'`").lower() for w in answer.split()]
    return next((w for w in words if w in CLASSES), None)


def llm_classes(dashboards: dict[str, Any], labels: dict[int, str], url: str, model: str,
                api_key: str | None = None, limit: int | None = None, timeout_s: float = 60.0,
                progress: bool = True) -> tuple[Classes, int]:
    """A class for each live feature (the first `limit`) from an OpenAI-compatible endpoint;
    returns them and how many features got none (they keep the rule's class)."""
    found, failed = ask_live_features(dashboards, url, model,
                                      lambda f: classifier_messages(f, labels.get(f["index"])), parse_class,
                                      "class", api_key, limit, max_tokens=4, timeout_s=timeout_s, progress=progress)
    return {i: (name, f"llm:{model}") for i, name in found.items()}, failed


def read_classes(folder: str | Path) -> Classes:
    """`feature_classes.json` beside an SAE ({} when there is none)."""
    path = Path(folder) / CLASSES_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        out = {int(k): (str(v["class"]), str(v.get("source", "file"))) for k, v in raw.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptFileError(f"{CLASSES_FILE}: not a classes file ({type(exc).__name__})") from None
    bad = sorted({c for c, _ in out.values()} - set(CLASSES))
    if bad:
        raise CorruptFileError(f"{CLASSES_FILE}: unknown class {bad[0]!r}; expected one of {', '.join(CLASSES)}")
    return out


def write_classes(folder: str | Path, classes: Classes) -> Path:
    path = Path(folder) / CLASSES_FILE
    path.write_text(json.dumps({str(i): {"class": c, "source": s} for i, (c, s) in sorted(classes.items())},
                               indent=0) + "\n")
    return path


def feature_classes(dashboards: dict[str, Any] | None, stored: Classes | None = None) -> Classes:
    """Each live feature's class and its source: the rule's, overridden by `stored` ones."""
    out: Classes = {f["index"]: (c, "rule") for f in (dashboards or {}).get("features", [])
                    if (c := classify(f)) is not None}
    out.update(stored or {})
    return out
