"""The paper's audit of one adapter on preference pairs (`fsrl analyze`).

What preference optimisation pushes on, read through the SAE's feature classes
(`fsrl.features.classes`: alignment, style, other; "unclassified" for features that never fired
on the dashboards' corpus):

(a) Usage by context. Over the tokens of the prompts, prompt + chosen and prompt + rejected
    (position 0 left out, as everywhere the SAE is read), count the steering entries v_i != 0
    that land in each class and compare their share with the SAE's own base rate: the share of
    the SAE's active features (f_i > 0) in that class on the same tokens. Relative change =
    steered share / base rate - 1; the p-value is a two-sided exact binomial test of the
    steered count against the base rate (entries are treated as independent draws, as in the
    paper: with this many entries, small shifts are "significant", so read the relative change).
(b) Top steered features by mean |v| over those tokens, with labels and classes.
(c) Ablations: the held-out preference loss with v zeroed on the style class, on the alignment
    class, and on random same-size sets of classified features (several seeds).
(d) Steering fraction: per token keep only the top share of v's non-zero entries by |v|;
    loss against that share (0 is the base model, 1 the adapter).
(e) Eval loss with and without lambda * mean_tokens ||v||_1 (the paper's reported losses
    include the L1 term; `fsrl train`'s eval loss does not).

Every loss is the loss the adapter was trained with (SimPO or DPO, its beta and gamma, from
adapter.json), computed by `fsrl.train.trainer.evaluate`. An ablation or a fraction is an edit
of v (`EditedAdapter`), so the steering itself runs through `fsrl.steering` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fsrl.adapter import FsrlAdapter, SteeringAdapter
from fsrl.analysis import FeaturePush, top_features
from fsrl.features.classes import CLASSES
from fsrl.train.config import TrainConfig
from fsrl.train.data import PreferenceDataset
from fsrl.train.trainer import EvalResult, TrainingSetup, evaluate

BUCKETS = (*CLASSES, "unclassified")
CONTEXTS = ("prompt", "prompt+chosen", "prompt+rejected")
PARTS = ("prompt", "chosen", "rejected")  # token sets the contexts are unions of
CONTEXT_PARTS = {"prompt": ("prompt",), "prompt+chosen": ("prompt", "chosen"),
                 "prompt+rejected": ("prompt", "rejected")}
ABLATED_CLASSES = ("style", "alignment")
DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


@dataclass(frozen=True)
class AuditSettings:
    """What one audit computes. `loss`, `beta`, `gamma`, `l1` default to the adapter's training."""

    loss: str = "simpo"
    beta: float | None = None
    gamma: float | None = None
    l1: float = 0.0                                 # lambda, for (e)
    max_length: int = 256
    batch_size: int = 4                             # pairs per forward
    random_seeds: int = 5
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    top: int = 20

    def train_config(self) -> TrainConfig:
        """The loss settings as `evaluate` reads them."""
        return TrainConfig(data="", out="", loss=self.loss, beta=self.beta, gamma=self.gamma,
                           max_length=self.max_length, batch_size=self.batch_size, progress=False)

    @classmethod
    def for_adapter(cls, adapter: FsrlAdapter, **overrides: Any) -> "AuditSettings":
        """Defaults from the adapter's own training record (adapter.json "training")."""
        training = adapter.config.training or {}
        found = {"loss": training.get("loss"), "beta": training.get("beta"), "gamma": training.get("gamma"),
                 "l1": training.get("l1_coefficient"), "max_length": training.get("max_length")}
        # An override of None (a flag not given) keeps the adapter's own value.
        given = {**{k: v for k, v in found.items() if v is not None},
                 **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**given)


# ------------------------------------------------------------------------------ edits of v

class EditedAdapter(SteeringAdapter):
    """An adapter whose v goes through `edit` before steering uses it: v' = edit(v)."""

    def __init__(self, adapter: FsrlAdapter, edit: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.inner, self.edit, self.name = adapter, edit, name
        self.config = adapter.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.edit(self.inner(x))


def zero_features(adapter: FsrlAdapter, indices: Iterable[int], name: str) -> EditedAdapter:
    """v with the given features set to 0 (an ablation "in v")."""
    mask = torch.zeros(adapter.config.d_sae, dtype=torch.bool)
    mask[list(indices)] = True

    def edit(v: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.to(v.device), torch.zeros_like(v), v)

    return EditedAdapter(adapter, edit, name)


def keep_top_fraction(adapter: FsrlAdapter, fraction: float) -> EditedAdapter:
    """Per token, v keeps its ceil(fraction * nnz) entries of largest |v| (nnz: its non-zero
    entries at that token) and zeroes the rest: 1 keeps v, 0 zeroes it."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} outside [0, 1]")

    def edit(v: torch.Tensor) -> torch.Tensor:
        nnz = (v != 0).sum(-1, keepdim=True)                                   # (..., 1)
        keep = torch.ceil(nnz.double() * fraction).long()                     # (..., 1)
        k = int(keep.max()) if keep.numel() else 0
        if k == 0:
            return torch.zeros_like(v)
        top = v.abs().topk(k, dim=-1)                                          # (..., k)
        kept = torch.arange(k, device=v.device) < keep                         # (..., k)
        mask = torch.zeros_like(v, dtype=torch.bool).scatter(-1, top.indices, kept)
        return torch.where(mask, v, torch.zeros_like(v))

    return EditedAdapter(adapter, edit, f"top {fraction:g}")


# ------------------------------------------------------------------------- (a) usage counts

@dataclass
class UsageCounts:
    """Per token set (PARTS) and class bucket (BUCKETS): steering entries v_i != 0, their |v|
    mass, and the SAE's active features f_i > 0; plus the tokens counted and the feature push
    over all of them."""

    steered: torch.Tensor           # (parts, buckets) float64 counts
    steered_mass: torch.Tensor      # (parts, buckets) sum of |v|
    sae_active: torch.Tensor        # (parts, buckets)
    tokens: torch.Tensor            # (parts,)
    push: FeaturePush


def bucket_of_features(classes: dict[int, str], d_sae: int) -> torch.Tensor:
    """Each feature's bucket index into BUCKETS: (d_sae,) long."""
    out = torch.full((d_sae,), BUCKETS.index("unclassified"), dtype=torch.long)
    for index, name in classes.items():
        out[index] = BUCKETS.index(name)
    return out


@torch.no_grad()
def usage_counts(setup: TrainingSetup, adapter: FsrlAdapter, dataset: PreferenceDataset, classes: dict[int, str],
                 batch_size: int, tick: Callable[[], None] = lambda: None) -> UsageCounts:
    """(a)'s counts over every pair of `dataset` (prompt tokens are counted once, from the
    chosen row: causal attention makes them the same in the rejected row)."""
    d_sae = setup.sae.d_sae
    bucket = bucket_of_features(classes, d_sae).to(setup.base.device)
    n_buckets = len(BUCKETS)
    steered = torch.zeros(len(PARTS), n_buckets, dtype=torch.float64)
    mass = torch.zeros_like(steered)
    active = torch.zeros_like(steered)
    tokens = torch.zeros(len(PARTS), dtype=torch.float64)
    push_sums = torch.zeros(3, d_sae, dtype=torch.float64)
    for start in range(0, len(dataset), batch_size):
        batch = dataset.batch(range(start, min(start + batch_size, len(dataset)))).to(setup.base.device)
        x = setup.base.activations(setup.hook.site, batch.input_ids, batch.attention_mask)
        v = adapter(x.to(adapter.W.dtype)).double()                           # (2B, T, d_sae)
        f = setup.sae.encode(x)                                               # (2B, T, d_sae)
        B = batch.n_pairs
        counted = (batch.positions >= 1)                                      # position 0 left out
        response = batch.response_mask & counted
        prompt = counted & ~batch.response_mask
        prompt[B:] = False                                                    # once per pair
        for p, mask in enumerate((prompt, response & _rows(B, True, response), response & _rows(B, False, response))):
            vm, fm = v[mask], f[mask]                                         # (n, d_sae)
            steered[p] += _per_bucket((vm != 0).double().sum(0), bucket, n_buckets)
            mass[p] += _per_bucket(vm.abs().sum(0), bucket, n_buckets)
            active[p] += _per_bucket((fm > 0).double().sum(0), bucket, n_buckets)
            tokens[p] += mask.sum().item()
            push_sums += torch.stack([vm.sum(0), vm.abs().sum(0), (vm != 0).double().sum(0)]).cpu()
        tick()
    return UsageCounts(steered, mass, active, tokens,
                       FeaturePush.from_sums(*push_sums, float(tokens.sum())))


def _rows(pairs: int, chosen: bool, like: torch.Tensor) -> torch.Tensor:
    """(2B, 1) mask of the chosen rows (first B) or the rejected rows."""
    rows = torch.zeros(like.shape[0], 1, dtype=torch.bool, device=like.device)
    rows[:pairs] = chosen
    rows[pairs:] = not chosen
    return rows


def _per_bucket(per_feature: torch.Tensor, bucket: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64).index_add_(0, bucket.cpu(), per_feature.double().cpu())


def binomial_p_value(k: int, n: int, p: float) -> float | None:
    """Two-sided exact binomial test of k successes in n draws at rate p (None if undefined)."""
    if n == 0 or not 0.0 < p < 1.0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(k, n, p).pvalue)


def usage_table(counts: UsageCounts, classes: dict[int, str], d_sae: int) -> list[dict[str, Any]]:
    """One row per (context, class): steered entries and their share, the SAE's base rate on
    the same tokens, relative change, p-value, the class's share of the SAE's width and of the
    steering mass."""
    width = torch.bincount(bucket_of_features(classes, d_sae), minlength=len(BUCKETS)).double()
    rows = []
    for context in CONTEXTS:
        parts = [PARTS.index(p) for p in CONTEXT_PARTS[context]]
        steered, mass, active = (t[parts].sum(0) for t in (counts.steered, counts.steered_mass, counts.sae_active))
        for b, name in enumerate(BUCKETS):
            share = float(steered[b] / steered.sum()) if steered.sum() else 0.0
            base_rate = float(active[b] / active.sum()) if active.sum() else 0.0
            rows.append({
                "context": context, "class": name, "tokens": int(counts.tokens[parts].sum()),
                "steered": int(steered[b]), "steered_share": share, "base_rate": base_rate,
                "relative_change": share / base_rate - 1.0 if base_rate else None,
                "p_value": binomial_p_value(int(steered[b]), int(steered.sum()), base_rate),
                "width_share": float(width[b] / d_sae),
                "mass_share": float(mass[b] / mass.sum()) if mass.sum() else 0.0,
            })
    return rows


# ------------------------------------------------------------------ (c), (d), (e): losses

def _eval_row(name: str, result: EvalResult, **extra: Any) -> dict[str, Any]:
    return {"name": name, "loss": result.loss, "accuracy": result.accuracy, "mean_l0": result.mean_l0,
            "mean_l1": result.mean_l1, **extra}


def random_sets(candidates: Sequence[int], size: int, seeds: Sequence[int]) -> list[list[int]]:
    """A random subset of `candidates` of `size` for each seed (torch.Generator(seed))."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(candidates), generator=g)[:size]
        out.append(sorted(int(candidates[i]) for i in order))
    return out


@dataclass
class AuditReport:
    settings: dict[str, Any]
    pairs: int
    d_sae: int
    class_sizes: dict[str, int]
    usage: list[dict[str, Any]]
    top_features: list[dict[str, Any]]
    evaluation: dict[str, Any]
    ablations: list[dict[str, Any]]
    sweep: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what `/adapters/{id}/card` serves)."""
        ablation = {r["name"]: round(r["loss"], 4) for r in self.ablations if r.get("seed") is None}
        for name in ABLATED_CLASSES:
            rand = [r["loss"] for r in self.ablations if r["name"] == f"random, {name} size"]
            if rand:
                ablation[f"random, {name} size (mean of {len(rand)})"] = round(sum(rand) / len(rand), 4)
        usage = {r["class"]: round(r["relative_change"], 4) if r["relative_change"] is not None else None
                 for r in self.usage if r["context"] == "prompt+chosen"}
        return {
            "pairs": self.pairs,
            "loss": self.settings["loss"],
            "eval_loss": round(self.evaluation["loss"], 4),
            "eval_loss_with_l1": round(self.evaluation["loss_with_l1"], 4),
            "l1_coefficient": self.settings["l1"],
            "base_loss": round(self.evaluation["base_loss"], 4),
            "accuracy": round(self.evaluation["accuracy"], 4),
            "mean_l0": round(self.evaluation["mean_l0"], 1),
            "mean_l0_share_of_width": round(self.evaluation["mean_l0"] / self.d_sae, 4),
            "usage_relative_change_prompt_chosen": usage,
            "ablation_loss": ablation,
            "sweep_loss": {f"{r['fraction']:g}": round(r["loss"], 4) for r in self.sweep},
            "top_features": [{k: f.get(k) for k in ("index", "label", "class", "mean_abs_v")}
                             for f in self.top_features[:10]],
        }

    def to_json(self) -> dict[str, Any]:
        return {"format": "fsrl-audit", "format_version": 1, **self.meta, "summary": self.summary(),
                **{k: v for k, v in asdict(self).items() if k != "meta"}}


def audit(setup: TrainingSetup, adapter: FsrlAdapter, dataset: PreferenceDataset, classes: dict[int, str],
          settings: AuditSettings, progress: bool = True) -> AuditReport:
    """(a)-(e) for `adapter` over `dataset` (see the module docstring)."""
    from tqdm.auto import tqdm

    cfg = settings.train_config()
    d_sae = setup.sae.d_sae
    members = {name: sorted(i for i, c in classes.items() if c == name) for name in CLASSES}
    members["unclassified"] = sorted(set(range(d_sae)) - set(classes))
    classified = sorted(classes)
    variants: list[tuple[str, FsrlAdapter | EditedAdapter | None, dict[str, Any]]] = [
        ("base model", None, {}), ("adapter", adapter, {})]
    for name in ABLATED_CLASSES:
        variants.append((f"{name} zeroed", zero_features(adapter, members[name], name), {"features": len(members[name])}))
    for c, name in enumerate(ABLATED_CLASSES):
        seeds = [1000 * c + s for s in range(settings.random_seeds)]  # other sets for each class
        for seed, chosen in zip(seeds, random_sets(classified, len(members[name]), seeds)):
            variants.append((f"random, {name} size", zero_features(adapter, chosen, f"random {seed}"),
                             {"features": len(chosen), "seed": seed}))
    fractions = [f for f in settings.fractions if 0.0 < f < 1.0]
    for fraction in fractions:
        variants.append((f"top {fraction:g}", keep_top_fraction(adapter, fraction), {"fraction": fraction}))

    batches = math.ceil(len(dataset) / settings.batch_size)
    bar = tqdm(total=batches * (1 + len(variants)), desc="analyze", unit="batch", disable=not progress)
    counts = usage_counts(setup, adapter, dataset, classes, settings.batch_size, tick=lambda: bar.update())
    results: list[tuple[str, EvalResult, dict[str, Any]]] = []
    for name, variant, extra in variants:
        bar.set_postfix_str(name)
        results.append((name, _evaluate_ticking(setup, variant, dataset, cfg, bar), extra))
    bar.close()

    by_name = {name: result for name, result, extra in results if "seed" not in extra and "fraction" not in extra}
    base, full = by_name["base model"], by_name["adapter"]
    top = top_features(counts.push, setup.sae, settings.top)
    for entry in top:
        entry["class"] = classes.get(entry["index"], "unclassified")
    evaluation = {"loss": full.loss, "accuracy": full.accuracy, "mean_l0": full.mean_l0, "mean_l1": full.mean_l1,
                  "loss_with_l1": full.loss + settings.l1 * full.mean_l1, "l1_coefficient": settings.l1,
                  "base_loss": base.loss, "base_accuracy": base.accuracy}
    ablations = [_eval_row(name, result, **extra) for name, result, extra in results if "fraction" not in extra]
    sweep = ([{"fraction": 0.0, **_eval_row("base model", base)}]
             + [_eval_row(name, result, fraction=extra["fraction"]) for name, result, extra in results
                if "fraction" in extra]
             + [{"fraction": 1.0, **_eval_row("adapter", full)}])
    resolved = {**asdict(settings), "fractions": list(settings.fractions), "beta": cfg.resolved_beta,
                "gamma": cfg.resolved_gamma}
    return AuditReport(settings=resolved, pairs=len(dataset),
                       d_sae=d_sae, class_sizes={name: len(members[name]) for name in BUCKETS},
                       usage=usage_table(counts, classes, d_sae), top_features=top, evaluation=evaluation,
                       ablations=ablations, sweep=sweep)


def _evaluate_ticking(setup: TrainingSetup, adapter, dataset: PreferenceDataset, cfg: TrainConfig, bar) -> EvalResult:
    """`evaluate` over the whole dataset, advancing the progress bar once per batch."""
    result = evaluate(setup.base, setup.hook, adapter, dataset, cfg)
    bar.update(math.ceil(len(dataset) / (cfg.eval_batch_size or cfg.batch_size)))
    return result
