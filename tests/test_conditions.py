"""Conditional steering against API.md's formula, in float64: an override with `when` applies
only where its condition passes on f before steering, and `abort_when` reports the first
condition that passes at a generated position."""

import copy

import pytest
import torch

from fsrl.errors import FsrlError
from fsrl.generation import GenerationRequest, Generator
from fsrl.overrides import MAX_CONDITIONS, Condition, FeatureOverride
from fsrl.sampling import SamplingParams
from fsrl.steering import RowSteering, SteeringBatch, steer
from fsrl.testing import tiny_adapter, tiny_base, tiny_sae

FP32 = dict(rtol=1e-5, atol=5e-5)  # as tests/test_steering.py: float32 against float64


def passes(f: torch.Tensor, c: Condition) -> torch.Tensor:
    return f[:, c.index] > c.threshold if c.comparison == "above" else f[:, c.index] < c.threshold


def reference(x, sae, adapter, scale, overrides):
    """One row (T, d_in), written from the formula: g = f + s v, each override applied to g_i
    at the positions where its condition (on f) passes, x' = x + (g - f) @ W_dec."""
    sae64 = copy.deepcopy(sae).double()
    x64 = x.double()
    f = sae64.encode(x64)
    g = f + scale * (copy.deepcopy(adapter).double()(x64) if adapter is not None else 0.0)
    for o in overrides:
        at = passes(f, o.when) if o.when is not None else torch.ones(len(x), dtype=torch.bool)
        i = o.index
        new = {"set": torch.full_like(g[:, i], o.value), "add": g[:, i] + o.value,
               "scale": g[:, i] * o.value, "ablate": torch.zeros_like(g[:, i]), "unsteer": f[:, i]}[o.op]
        g[:, i] = torch.where(at, new, g[:, i])
    return x64 + (g - f) @ sae64.W_dec, f


def conditions_on(f: torch.Tensor, index: int, comparison: str) -> Condition:
    """A condition on feature `index` that passes at some positions and not at others: its
    threshold halfway between two of its distinct values (far from both)."""
    values = f[:, index].unique()
    assert len(values) >= 2, f"feature {index} takes one value only"
    mid = len(values) // 2
    return Condition(index, comparison, float((values[mid - 1] + values[mid]) / 2))


def busiest_features(f: torch.Tensor, n: int) -> list[int]:
    return f.gt(0).sum(0).argsort(descending=True)[:n].tolist()


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("op,value", [("set", 8.0), ("add", 2.5), ("scale", -1.5), ("ablate", 0.0)])
def test_a_conditional_op_applies_exactly_where_its_condition_passes(architecture, op, value):
    sae = tiny_sae(architecture=architecture)
    adapter = tiny_adapter(sae)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3)) * 3
    f = sae.encode(x)
    watched, target, plain = busiest_features(f, 3)
    overrides = [FeatureOverride(target, op, value, when=conditions_on(f, watched, "above")),
                 FeatureOverride(plain, "add", 1.0, when=conditions_on(f, watched, "below")),
                 FeatureOverride(5 if 5 not in (watched, target, plain) else 6, "add", -2.0)]
    batch = SteeringBatch.build([RowSteering(adapter, 0.7, overrides)], sae.d_sae)
    got = steer(x[None], sae, batch, torch.arange(9)[None]).x[0]
    want, f64 = reference(x, sae, adapter, 0.7, overrides)
    torch.testing.assert_close(got.double(), want, **FP32)
    # Not vacuous: the condition both passes and fails, and ignoring it would change the answer.
    at = passes(f64, overrides[0].when)
    assert at.any() and not at.all()
    always = [FeatureOverride(o.index, o.op, o.value) for o in overrides]
    assert (reference(x, sae, adapter, 0.7, always)[0] - want).abs().max() > 1e-3


def test_a_condition_that_never_passes_leaves_the_op_out_and_one_that_always_does_keeps_it():
    sae = tiny_sae(architecture="relu")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4)) * 3
    op = FeatureOverride(7, "set", 6.0)

    def run(when):
        batch = SteeringBatch.build([RowSteering(None, 1.0, [FeatureOverride(7, "set", 6.0, when=when)])], sae.d_sae)
        return steer(x[None], sae, batch, torch.arange(5)[None]).x[0]

    unconditional = steer(x[None], sae, SteeringBatch.build([RowSteering(None, 1.0, [op])], sae.d_sae),
                          torch.arange(5)[None]).x[0]
    assert torch.equal(run(Condition(3, "above", 1e4)), x)
    torch.testing.assert_close(run(Condition(3, "below", 1e4)), unconditional)
    assert not torch.allclose(unconditional, x)


def test_abort_reports_the_first_condition_that_passes_at_generated_positions_only():
    sae = tiny_sae(architecture="relu")
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(6)) * 3
    f = sae.encode(x)
    a, b = busiest_features(f[0], 2)
    first = conditions_on(f[0], a, "above")
    second = Condition(b, "below", 1e4)  # passes everywhere
    rows = [RowSteering(abort_when=[first, second], generated_from=5),
            RowSteering(abort_when=[Condition(a, "above", 1e4)], generated_from=2)]  # never passes
    batch = SteeringBatch.build(rows, sae.d_sae)
    out = steer(x, sae, batch, torch.arange(8).expand(2, -1))
    f64 = copy.deepcopy(sae).double().encode(x[0].double())
    want = [(-1 if t < 5 else a if passes(f64, first)[t] else b) for t in range(8)]
    assert out.fired[0].tolist() == want and a in want
    assert out.fired[1].tolist() == [-1] * 8
    assert torch.equal(out.x, x)  # conditions alone steer nothing


def test_vllm_s_steering_site_reads_conditions_as_a_built_batch_does():
    """vLLM's steering site (`SteeringSite`, plain torch) gives what `SteeringBatch.build` gives,
    conditions and abort conditions included."""
    from test_steering import through_site

    sae = tiny_sae()
    adapter = tiny_adapter(sae, seed=3)
    x = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(5)) * 3
    f = sae.encode(x[0])
    watched, target = busiest_features(f, 2)
    rows = [RowSteering(adapter, 0.7, [FeatureOverride(target, "set", 8.0, when=conditions_on(f, watched, "above"))],
                        abort_when=[conditions_on(f, watched, "below")], generated_from=2),
            RowSteering(None, 1.0, [FeatureOverride(9, "add", 2.0)])]
    positions = torch.arange(6).expand(3, -1)
    got, fired = through_site(sae, rows, x, positions, adapters=(adapter,))
    want = steer(x[:2], sae, SteeringBatch.build(rows, sae.d_sae), positions[:2])
    torch.testing.assert_close(got[:2], want.x, **FP32)
    assert torch.equal(fired[:2], want.fired) and (want.fired[0] >= 0).any()
    assert (fired[1:] == -1).all()


def test_conditions_are_bounded_and_checked_against_the_sae():
    sae = tiny_sae()
    many = [FeatureOverride(i, "add", 1.0, when=Condition(0, "above", 0.0)) for i in range(MAX_CONDITIONS)]
    with pytest.raises(FsrlError, match="abort_when: at most 16 conditions"):
        RowSteering(overrides=many, abort_when=[Condition(1, "below", 0.0)]).check(sae.d_sae)
    with pytest.raises(FsrlError, match=r"abort_when: index 999 is out of range"):
        RowSteering(abort_when=[Condition(999, "above", 0.0)]).check(sae.d_sae)
    with pytest.raises(FsrlError, match=r"features: index 999 is out of range"):
        RowSteering(overrides=[FeatureOverride(1, "add", 1.0, when=Condition(999, "above", 0.0))]).check(sae.d_sae)


def test_generation_stops_a_row_when_its_abort_condition_passes():
    """The row whose condition passes on its third generated token stops there, with
    finish_reason "feature" and no fourth token; the other row of the batch goes on."""
    base, sae = tiny_base(), tiny_sae()
    generator = Generator(base, sae, layer=1)
    prompt = [5, 6, 7, 8]
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    free = generator.generate([GenerationRequest(prompt, sampling=sampling)])[0]
    # The activations at the generated positions, read with a condition that never passes.
    with torch.inference_mode():
        ids = torch.tensor([prompt + free.token_ids])
        hidden = base.activations(generator.site, ids, torch.ones_like(ids))[0]
    f = sae.encode(hidden)[len(prompt):]                                       # generated positions
    feature = int(f[2].argmax())
    threshold = float(f[:2, feature].max().clamp(min=0) + f[2, feature]) / 2
    assert f[2, feature] > threshold >= f[:2, feature].max()
    stop = RowSteering(abort_when=[Condition(feature, "above", threshold)], generated_from=len(prompt))
    got = generator.generate([GenerationRequest(prompt, stop, sampling), GenerationRequest(prompt, sampling=sampling)])
    assert got[0].finish_reason == "feature" and got[0].fired_feature == feature
    assert got[0].token_ids == free.token_ids[:3]
    assert got[0].text == base.tokenizer.decode(free.token_ids[:3], skip_special_tokens=True)
    assert got[1].token_ids == free.token_ids and got[1].finish_reason == "length"
