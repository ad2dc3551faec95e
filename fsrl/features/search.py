"""Search over an SAE's features: labels, the tokens they peak on, the tokens they promote.

A query matches a feature when it occurs (case-insensitively, as a substring: "apolog" finds
"apologize") in its label, in a peak token of its top contexts or in a promoted token. Score:
    label      4, plus 2 when a word of the label starts with the query
    peak       2 + the share of its top contexts whose peak token holds the query
    promoted   1
summed over the three; ties go to the denser feature, then the lower index. Each feature with
a dashboard also has a class (`fsrl.features.classes`), and a search can keep one class.
"""

from __future__ import annotations

from typing import Any

from fsrl.features.classes import Classes, feature_classes
from fsrl.features.labels import token_name


class FeatureIndex:
    def __init__(self, d_sae: int, labels: dict[int, str], sources: dict[int, str],
                 dashboards: dict[str, Any] | None, stored_classes: Classes | None = None):
        self.d_sae = d_sae
        self.labels, self.sources = labels, sources
        self.dashboards = dashboards
        self.entries: dict[int, dict[str, Any]] = {f["index"]: f for f in (dashboards or {}).get("features", [])}
        self._peaks = {i: [token_name(c["tokens"][c["peak"]]).lower() for c in f.get("top_contexts") or []]
                       for i, f in self.entries.items()}
        self._promoted = {i: [token_name(t).lower() for t, _ in f.get("promoted") or []]
                          for i, f in self.entries.items()}
        with_source = feature_classes(dashboards, stored_classes)
        self.classes = {i: c for i, (c, _) in with_source.items()}
        self.class_sources = {i: source for i, (_, source) in with_source.items()}

    @property
    def has_dashboards(self) -> bool:
        return self.dashboards is not None

    def score(self, index: int, query: str) -> float:
        score = 0.0
        label = self.labels.get(index, "").lower()
        if query in label:
            score += 4 + 2 * any(word.strip("\"'“”()").startswith(query) for word in label.split())
        peaks = self._peaks.get(index, [])
        hits = sum(query in p for p in peaks)
        if hits:
            score += 2 + hits / len(peaks)
        if any(query in p for p in self._promoted.get(index, [])):
            score += 1
        return score

    def search(self, query: str, limit: int = 20, feature_class: str | None = None) -> list[dict[str, Any]]:
        """Best first; with `feature_class`, only features of that class."""
        query = query.strip().lower()
        if not query:
            return []
        scored = [(s, i) for i in range(self.d_sae) if (s := self.score(i, query)) > 0
                  and (feature_class is None or self.classes.get(i) == feature_class)]
        scored.sort(key=lambda si: (-si[0], -self.density(si[1]), si[1]))
        return [{**self.summary(i), "score": round(s, 3)} for s, i in scored[:limit]]

    def density(self, index: int) -> float:
        return float(self.entries.get(index, {}).get("density", 0.0))

    def summary(self, index: int) -> dict[str, Any]:
        return {"index": index, "label": self.labels.get(index), "label_source": self.sources.get(index),
                "class": self.classes.get(index), "class_source": self.class_sources.get(index),
                "density": self.entries[index]["density"] if index in self.entries else None,
                "peak_tokens": sorted(set(self._peaks.get(index, [])), key=self._peaks.get(index, []).count,
                                      reverse=True)[:3],
                "promoted": [t for t, _ in self.entries.get(index, {}).get("promoted", [])[:3]]}

    def card(self, index: int) -> dict[str, Any]:
        """Everything known of one feature: its label and, where dashboards were built, its
        dashboard (null fields where not)."""
        entry = self.entries.get(index, {})
        edges = (self.dashboards or {}).get("histogram_edges")
        hist = entry.get("histogram")
        return {"index": index, "label": self.labels.get(index), "label_source": self.sources.get(index),
                "class": self.classes.get(index), "class_source": self.class_sources.get(index),
                "density": entry.get("density"), "max_activation": entry.get("max_activation"),
                "histogram": {"edges": edges, "counts": hist} if hist is not None else None,
                "top_contexts": entry.get("top_contexts") if self.has_dashboards else None,
                "promoted": entry.get("promoted"), "suppressed": entry.get("suppressed"),
                "corpus": (self.dashboards or {}).get("corpus"),
                "corpus_tokens": (self.dashboards or {}).get("tokens")}
