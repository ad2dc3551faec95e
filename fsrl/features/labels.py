"""Short feature labels, each recording where it came from.

Sources:
    rule            offline, from the feature's dashboard (`rule_label`, below): the tokens it
                    peaks on and the output token it promotes most
    llm:<model>     any OpenAI-compatible chat endpoint, shown the dashboard's contexts
    neuronpedia...  explanations published in Neuronpedia's export format, for public SAEs
    file            a labels file written before sources were recorded

Stored beside the SAE as `feature_labels.json`: {"<index>": {"label": str, "source": str}}
(a file of plain {"<index>": str} still reads, as source "file").
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fsrl.errors import CorruptFileError, FsrlError

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 60
Labels = dict[int, tuple[str, str]]  # index -> (label, source)
WHITESPACE_NAMES = {"\n": "newline", "\n\n": "blank line", " ": "space", "\t": "tab"}


def token_name(token: str) -> str:
    """A token as a label shows it: trimmed, whitespace by name."""
    if token in WHITESPACE_NAMES:
        return WHITESPACE_NAMES[token]
    stripped = token.strip()
    if not stripped:
        return "newline" if "\n" in token else "space"
    return stripped


def rule_label(feature: dict[str, Any]) -> str | None:
    """The offline rule, from a dashboard entry; None for a feature that never fired.

    1. The peak token of each top context, named (`token_name`), counted case-insensitively.
    2. If one covers at least half of the contexts, it alone: `"list"`; else the two most
       common: `"list" / "items"`.
    3. If at least half of the contexts also share the token just before the peak, it is
       named too: `"python" after "a"`.
    (Promoted tokens stay out of the label: through the logit lens at a middle layer they
    are often word pieces; dashboards and search still show them.)
    """
    contexts = feature.get("top_contexts") or []
    if not feature.get("density") or not contexts:
        return None
    peaks = Counter(token_name(c["tokens"][c["peak"]]).lower() for c in contexts)
    ranked = [t for t, _ in peaks.most_common()]
    words = ranked[:1] if peaks[ranked[0]] * 2 >= len(contexts) else ranked[:2]
    label = " / ".join(f'"{w}"' for w in words)
    before = Counter(token_name(c["tokens"][c["peak"] - 1]).lower() for c in contexts if c["peak"] > 0)
    if before:
        word, count = before.most_common(1)[0]
        if count * 2 >= len(contexts):
            label += f' after "{word}"'
    return label[:MAX_LABEL_CHARS]


def rule_labels(dashboards: dict[str, Any]) -> Labels:
    return {f["index"]: (label, "rule") for f in dashboards["features"]
            if (label := rule_label(f)) is not None}


def context_text(context: dict[str, Any]) -> str:
    """A top context with its peak token in ⟦ ⟧."""
    return "".join(f"⟦{t}⟧" if i == context["peak"] else t for i, t in enumerate(context["tokens"]))


LABELER_PROMPT = ("You label features of a sparse autoencoder trained on a language model's "
                  "residual stream. Each example below is text on which the feature fires most; "
                  "the token where it peaks is in ⟦ ⟧. Reply with one label of at most six words "
                  "saying what the feature responds to, and nothing else.")


def labeler_messages(feature: dict[str, Any]) -> list[dict[str, str]]:
    examples = "\n".join(f"{n}. {context_text(c)}" for n, c in enumerate(feature.get("top_contexts") or [], 1))
    promoted = ", ".join(repr(t) for t, _ in (feature.get("promoted") or [])[:8])
    return [{"role": "system", "content": LABELER_PROMPT},
            {"role": "user", "content": f"Examples:\n{examples}\n\nOutput tokens it promotes: {promoted}\n\nLabel:"}]


def clean_label(text: str) -> str | None:
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    line = re.sub(r"^(label\s*:\s*)", "", line, flags=re.IGNORECASE).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`*":  # one pair of quotes around it
        line = line[1:-1].strip()
    return line[:MAX_LABEL_CHARS] or None


def ask_chat(url: str, model: str, messages: list[dict[str, str]], api_key: str | None = None,
             max_tokens: int = 24, timeout_s: float = 60.0, retries: int = 3) -> str | None:
    """One answer from an OpenAI-compatible chat endpoint (`url` is its base, such as
    http://host:8000/v1), greedy, through the official `openai` client (which retries with
    backoff); None when there is still no answer, logged with its cause. The key defaults to
    $FSRL_LABELER_KEY, then $OPENAI_API_KEY. What the labeler, the classifier and `fsrl eval`'s
    judge send."""
    try:
        from openai import OpenAI, OpenAIError
    except ImportError:
        raise FsrlError("asking an OpenAI-compatible endpoint needs the openai package: pip install 'fsrl[llm]'") from None
    key = api_key or os.environ.get("FSRL_LABELER_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    client = OpenAI(base_url=url, api_key=key, timeout=timeout_s, max_retries=retries)
    try:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content or ""
    except (OpenAIError, IndexError, AttributeError) as exc:
        log.warning("no answer from %s (%s: %s)", url, type(exc).__name__, str(exc)[:200])
        return None


def ask_live_features(dashboards: dict[str, Any], url: str, model: str,
                      messages: Callable[[dict[str, Any]], list[dict[str, str]]],
                      parse: Callable[[str], str | None], what: str, api_key: str | None = None,
                      limit: int | None = None, max_tokens: int = 24, timeout_s: float = 60.0,
                      progress: bool = True) -> tuple[dict[int, str], int]:
    """One answer per live feature (the first `limit`) from an OpenAI-compatible endpoint,
    parsed; returns index -> parsed answer and how many features got none (an error, or an
    answer `parse` rejects). Raises when no feature got one."""
    from tqdm.auto import tqdm

    live = [f for f in dashboards["features"] if f.get("top_contexts")][:limit]
    found: dict[int, str] = {}
    for feature in tqdm(live, desc=what, unit="feature", disable=not progress):
        answer = ask_chat(url, model, messages(feature), api_key, max_tokens=max_tokens, timeout_s=timeout_s)
        value = parse(answer) if answer is not None else None
        if value is not None:
            found[feature["index"]] = value
    if live and not found:
        raise FsrlError(f"the endpoint at {url} gave no {what} for any of {len(live)} features")
    return found, len(live) - len(found)


def llm_labels(dashboards: dict[str, Any], url: str, model: str, api_key: str | None = None,
               limit: int | None = None, timeout_s: float = 60.0, progress: bool = True) -> tuple[Labels, int]:
    """A label for each live feature (the first `limit`) from an OpenAI-compatible chat
    endpoint. Returns the labels and how many features got none (they keep their other label)."""
    found, failed = ask_live_features(dashboards, url, model, labeler_messages, clean_label, "label", api_key,
                                      limit, timeout_s=timeout_s, progress=progress)
    return {i: (label, f"llm:{model}") for i, label in found.items()}, failed


def neuronpedia_labels(path: str | Path, d_sae: int) -> Labels:
    """Explanations in Neuronpedia's export format: a JSON list, or JSON Lines (gzipped or not),
    of records with `index` and `description` (and `explanationModelName`)."""
    path = Path(path)
    if not path.exists():
        raise FsrlError(f"explanations file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
        records: Iterable[Any] = (json.loads(text) if text.lstrip().startswith("[")
                                  else [json.loads(line) for line in text.splitlines() if line.strip()])
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptFileError(f"{path.name}: not Neuronpedia explanations ({type(exc).__name__})") from None
    labels: Labels = {}
    for record in records:
        try:
            index, description = int(record["index"]), str(record["description"]).strip()
        except (KeyError, TypeError, ValueError):
            continue
        if 0 <= index < d_sae and description and index not in labels:
            by = record.get("explanationModelName")
            labels[index] = (description[:MAX_LABEL_CHARS * 2], f"neuronpedia:{by}" if by else "neuronpedia")
    if not labels:
        raise FsrlError(f"{path.name} holds no explanation for an index below {d_sae}")
    return labels
