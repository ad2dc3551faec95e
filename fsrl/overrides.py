"""Per-request feature overrides as data: the ops, the bounds and the contract's rules.

No torch here, so the HTTP edge can check a request against the same rules (and the same
bounds) without loading the model's stack; `fsrl.steering` turns overrides into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fsrl.errors import FsrlError

OPS = ("set", "add", "scale", "ablate", "unsteer")
COMPARISONS = ("above", "below")  # a condition passes where f_j > t ("above") or f_j < t ("below")
OPS_NEEDING_VALUE = ("set", "add", "scale")
MAX_FEATURE_OVERRIDES = 256
MAX_RETURN_FEATURES = 64  # top steered features a request may ask for per token
# Bounds that keep every product finite in float32/bf16: feature activations of real SAEs are
# in the tens to thousands, so 1e4 sets or adds far past any of them without overflowing.
MAX_FEATURE_VALUE = 1e4
MAX_STEERING_SCALE = 100.0
MAX_CONDITIONS = 16  # `when`s and `abort_when`s of one request together
# A contrast (fsrl.contrast, POST /features/contrast): texts a set, characters a text, features back.
MIN_CONTRAST_TEXTS, MAX_CONTRAST_TEXTS, MAX_CONTRAST_TEXT_CHARS, MAX_CONTRAST_TOP = 2, 64, 8192, 256


@dataclass(frozen=True)
class Condition:
    """Feature `index`'s SAE activation (before steering, at the SAE's site) compared with
    `threshold` at one position: passes where f > threshold ("above") or f < threshold ("below")."""

    index: int
    comparison: str
    threshold: float


@dataclass(frozen=True)
class FeatureOverride:
    index: int
    op: str
    value: float = 0.0
    when: Condition | None = None  # applies only at positions where it passes


def validate_condition(c: Condition, d_sae: int, where: str) -> None:
    if c.comparison not in COMPARISONS:
        raise FsrlError(f"{where}: unknown comparison {c.comparison!r}; expected one of {', '.join(COMPARISONS)}")
    if not 0 <= c.index < d_sae:
        raise FsrlError(f"{where}: index {c.index} is out of range [0, {d_sae})")
    if not abs(c.threshold) <= MAX_FEATURE_VALUE:  # NaN fails this too
        raise FsrlError(f"{where}: threshold {c.threshold} is outside [-{MAX_FEATURE_VALUE:g}, {MAX_FEATURE_VALUE:g}]")


def validate_conditions(overrides: Sequence[FeatureOverride], abort_when: Sequence[Condition], d_sae: int) -> None:
    """Each condition in range, and at most MAX_CONDITIONS of them in all."""
    count = sum(o.when is not None for o in overrides) + len(abort_when)
    if count > MAX_CONDITIONS:
        raise FsrlError(f"abort_when: at most {MAX_CONDITIONS} conditions a request (`when`s and "
                        f"`abort_when`s together), got {count}")
    for o in overrides:
        if o.when is not None:
            validate_condition(o.when, d_sae, "features")
    for c in abort_when:
        validate_condition(c, d_sae, "abort_when")


def validate_overrides(overrides: Sequence[FeatureOverride], d_sae: int) -> None:
    """The contract's rules: known op, index in range, one op per index, at most 256, a
    finite value within MAX_FEATURE_VALUE."""
    if len(overrides) > MAX_FEATURE_OVERRIDES:
        raise FsrlError(f"features: at most {MAX_FEATURE_OVERRIDES} overrides, got {len(overrides)}")
    seen: set[int] = set()
    for o in overrides:
        if o.op not in OPS:
            raise FsrlError(f"features: unknown op {o.op!r}; expected one of {', '.join(OPS)}")
        if not 0 <= o.index < d_sae:
            raise FsrlError(f"features: index {o.index} is out of range [0, {d_sae})")
        if o.index in seen:
            raise FsrlError(f"features: index {o.index} has more than one op")
        if not abs(o.value) <= MAX_FEATURE_VALUE:  # NaN fails this too
            raise FsrlError(f"features: value {o.value} of index {o.index} is outside "
                            f"[-{MAX_FEATURE_VALUE:g}, {MAX_FEATURE_VALUE:g}]")
        seen.add(o.index)
