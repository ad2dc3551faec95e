"""The steering intervention against API.md's formula, on a tiny random model and SAE."""

import copy

import pytest
import torch

from fsrl.sites import Site
from fsrl.testing import tiny_adapter, tiny_base, tiny_sae
from fsrl.overrides import FeatureOverride
from fsrl.steering import RowSteering, SteeringBatch, SteeringHook, _decode_delta, steer

LAYER = 1

# float32 against a float64 reference: the sums over the SAE's features round differently
# with each CPU's kernels (1.2e-5 seen on an Intel Xeon whose kernels differ from an EPYC's).
FP32 = dict(rtol=1e-5, atol=5e-5)


def reference_steer(x, sae, adapter, scale, overrides, clamp):
    """API.md's steering semantics written straight from the formula, in float64, one row."""
    sae64 = copy.deepcopy(sae).double()
    x64 = x.double()
    f = sae64.encode(x64)                                                   # (T, d_sae)
    v = copy.deepcopy(adapter).double()(x64) if adapter is not None else torch.zeros_like(f)
    g = f + scale * v
    if clamp:
        g = torch.relu(g)
    for o in overrides:
        i = o.index
        if o.op == "set":
            g[:, i] = o.value
        elif o.op == "add":
            g[:, i] = g[:, i] + o.value
        elif o.op == "scale":
            g[:, i] = g[:, i] * o.value
        elif o.op == "ablate":
            g[:, i] = 0.0
        elif o.op == "unsteer":
            g[:, i] = f[:, i]
    # x' = SAE.decode(g) + (x - SAE.decode(f)): the error term is kept.
    return sae64.decode(g) + (x64 - sae64.decode(f))


def run_steer(x, sae, rows, positions=None):
    """As the generator builds a batch: on the residual's device, in the SAE's dtype."""
    batch = SteeringBatch.build(rows, sae.d_sae, device=x.device, dtype=sae.W_dec.dtype)
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return steer(x, sae, batch, positions).x


@pytest.fixture(scope="module")
def base():
    return tiny_base()


def active_features(sae, adapter, x, n=3):
    """Indices that the adapter pushes and that the SAE has active, to make ops bite."""
    f = sae.encode(x)
    v = adapter(x)
    both = ((f > 0) & (v > 0)).any(0).nonzero().squeeze(-1).tolist()
    only_f = ((f > 0).any(0) & ~(v > 0).any(0)).nonzero().squeeze(-1).tolist()
    return both[:n], only_f[:n]


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("op,value", [("set", 8.0), ("add", 2.5), ("scale", -1.5),
                                      ("ablate", 0.0), ("unsteer", 0.0)])
def test_each_op_matches_float64_reference(architecture, op, value):
    sae = tiny_sae(architecture=architecture)
    adapter = tiny_adapter(sae)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3)) * 3
    both, only_f = active_features(sae, adapter, x)
    overrides = [FeatureOverride(i, op, value) for i in both + only_f + [5]]
    got = run_steer(x[None], sae, [RowSteering(adapter, 0.7, overrides)])[0]
    want = reference_steer(x, sae, adapter, 0.7, overrides, clamp=False)
    assert (got.double() - x.double()).abs().max() > 1e-3  # the steering did something
    torch.testing.assert_close(got.double(), want, **FP32)


@pytest.mark.parametrize("activation", ["relu", "soft_threshold"])
@pytest.mark.parametrize("clamp", [False, True])
def test_adapter_variants_and_clamp_match_reference(activation, clamp):
    sae = tiny_sae()
    adapter = tiny_adapter(sae, activation=activation, clamp_nonnegative=clamp)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4)) * 3
    overrides = [FeatureOverride(3, "add", -4.0), FeatureOverride(11, "scale", 2.0)]
    for scale in (1.0, -2.0):
        got = run_steer(x[None], sae, [RowSteering(adapter, scale, overrides)])[0]
        want = reference_steer(x, sae, adapter, scale, overrides, clamp=clamp)
        torch.testing.assert_close(got.double(), want, **FP32)


def test_soft_threshold_pushes_features_down():
    sae = tiny_sae()
    adapter = tiny_adapter(sae, activation="soft_threshold")
    v = adapter(torch.randn(9, 64) * 3)
    assert (v < 0).any() and (v > 0).any() and (v == 0).any()


def test_overrides_alone_steer_a_row_without_adapter():
    sae = tiny_sae(architecture="relu")
    x = torch.randn(4, 64) * 3
    overrides = [FeatureOverride(7, "set", 5.0), FeatureOverride(9, "ablate")]
    got = run_steer(x[None], sae, [RowSteering(None, 1.0, overrides)])[0]
    torch.testing.assert_close(got.double(), reference_steer(x, sae, None, 1.0, overrides, False),
                               **FP32)


def test_row_with_nothing_to_do_is_returned_untouched():
    sae = tiny_sae()
    adapter = tiny_adapter(sae)
    x = torch.randn(2, 6, 64)
    out = run_steer(x, sae, [RowSteering(adapter), RowSteering(None)])
    assert torch.equal(out[1], x[1])
    assert not torch.equal(out[0], x[0])
    # A zero scale with no overrides is no steering either.
    assert torch.equal(run_steer(x, sae, [RowSteering(adapter, 0.0)] * 2), x)


def test_mixed_rows_equal_each_row_alone():
    sae = tiny_sae()
    a1, a2 = tiny_adapter(sae, seed=1), tiny_adapter(sae, seed=2, activation="soft_threshold",
                                                     clamp_nonnegative=True)
    rows = [RowSteering(a1, 1.0), RowSteering(None), RowSteering(a2, 2.0, [FeatureOverride(4, "set", 3.0)]),
            RowSteering(a1, -0.5, [FeatureOverride(4, "ablate"), FeatureOverride(200, "add", 1.0)]),
            RowSteering(None, 1.0, [FeatureOverride(17, "scale", 3.0)])]
    x = torch.randn(len(rows), 5, 64) * 2
    together = run_steer(x, sae, rows)
    for b, row in enumerate(rows):
        alone = run_steer(x[b:b + 1], sae, [row])[0]
        torch.testing.assert_close(together[b], alone, **FP32)


def test_steer_from_leaves_earlier_positions_and_padding_alone():
    sae = tiny_sae()
    adapter = tiny_adapter(sae)
    x = torch.randn(1, 6, 64)
    positions = torch.tensor([[-1, 0, 1, 2, 3, 4]])  # one pad slot, then a 5-token row
    out = run_steer(x, sae, [RowSteering(adapter, steer_from=3)], positions)
    assert torch.equal(out[0, :4], x[0, :4])
    assert not torch.equal(out[0, 4:], x[0, 4:])


def test_sparse_decode_equals_dense_decode():
    sae = tiny_sae()
    d = torch.zeros(2, 3, sae.d_sae)
    d[0, 1, [3, 50]] = torch.tensor([1.5, -2.0])
    d[1, 2, 77] = 0.25
    torch.testing.assert_close(_decode_delta(d, sae), d @ sae.W_dec)
    d.requires_grad_(True)  # the training path
    torch.testing.assert_close(_decode_delta(d, sae), d @ sae.W_dec)


def test_capture_reports_top_deltas_at_last_position():
    sae = tiny_sae()
    batch = SteeringBatch.build([RowSteering(None, 1.0, [FeatureOverride(9, "add", 3.0),
                                                          FeatureOverride(4, "add", -5.0)])],
                                sae.d_sae, capture_top=2)
    out = steer(torch.randn(1, 3, 64), sae, batch, torch.arange(3)[None])
    assert out.top_index.tolist() == [[4, 9]]
    torch.testing.assert_close(out.top_delta, torch.tensor([[-5.0, 3.0]]))


def test_hook_applies_reference_steering_inside_the_model(base):
    """Logits of the hooked model equal the model run on the reference-steered residual."""
    sae = tiny_sae(layer=LAYER)
    adapter = tiny_adapter(sae)
    overrides = [FeatureOverride(10, "set", 4.0)]
    ids = torch.randint(3, 100, (1, 8))
    captured = {}

    def replace_with_reference(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured["x"] = hidden.detach().clone()
        new = reference_steer(hidden[0], sae, adapter, 1.5, overrides, clamp=False).float()[None]
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = base.layers[LAYER].register_forward_hook(replace_with_reference)
    try:
        want = base.model(input_ids=ids).logits
    finally:
        handle.remove()
    hook = SteeringHook(base.layers, Site(LAYER), sae)
    try:
        batch = SteeringBatch.build([RowSteering(adapter, 1.5, overrides)], sae.d_sae)
        with hook.steering(batch, torch.arange(8)[None]):
            got = base.model(input_ids=ids).logits
    finally:
        hook.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_validation_rejects_bad_overrides():
    from fsrl.errors import FsrlError

    sae = tiny_sae()
    for bad in ([FeatureOverride(sae.d_sae, "set", 1.0)], [FeatureOverride(-1, "add", 1.0)],
                [FeatureOverride(1, "boost", 1.0)],
                [FeatureOverride(1, "set", 1.0), FeatureOverride(1, "add", 1.0)],
                [FeatureOverride(i, "add", 1.0) for i in range(257)]):
        with pytest.raises(FsrlError):
            SteeringBatch.build([RowSteering(None, 1.0, bad)], sae.d_sae)


def through_site(sae, rows, x, positions, adapters=()):
    """Rows (B, T) steered as vLLM's model steers them (`SteeringSite`: the adapters in its bank,
    one table row per request, one "row" of `steer` per token); the last table row and every row
    beyond `rows` are left empty. Returns the steered x and each token's fired feature, (B, T, ...)."""
    from fsrl.vllm_plugin.site import SteeringSite

    B, T, d_in = x.shape
    site = SteeringSite(sae, bank_slots=max(len(adapters), 1), table_rows=B, max_tokens=B * T)
    for adapter in adapters:
        site.load_adapter(adapter.id, adapter)
    site.table.set_row(0, RowSteering(adapters[0]) if adapters else RowSteering(None, 1.0, [FeatureOverride(1, "add", 1.0)]))
    site.table.set_row(0, None)  # written, then emptied: nothing of it may stay
    for row, steering in enumerate(rows):
        site.table.set_row(row, steering)
    token_row = torch.arange(B)[:, None].expand(B, T).clone()
    token_row[len(rows):] = site.empty_row
    site.token_row.copy_(token_row.reshape(-1))
    out = site(x.reshape(B * T, d_in), positions.reshape(-1))
    return out.reshape(B, T, d_in), site.capture_fired.reshape(B, T)


def test_vllm_s_steering_site_steers_each_row_as_a_built_batch_does():
    """`SteeringSite` (the fixed-shape table inside vLLM's compiled model, plain torch): rows set
    in place, one emptied and reused, steer each token as `SteeringBatch.build` of the same rows
    steers it, and a token of no request leaves its residual untouched."""
    sae = tiny_sae()
    signed = tiny_adapter(sae, activation="soft_threshold", seed=3, adapter_id="signed")
    clamped = tiny_adapter(sae, clamp_nonnegative=True, seed=4, adapter_id="clamped")
    x = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(5)) * 3
    rows = [RowSteering(signed, 0.7, [FeatureOverride(3, "set", 8.0), FeatureOverride(9, "scale", -1.5)]),
            RowSteering(clamped, 2.0, steer_from=3),
            RowSteering(None, 1.0, [FeatureOverride(5, "ablate")])]
    positions = torch.arange(6).expand(4, -1)
    got, _ = through_site(sae, rows, x, positions, adapters=(signed, clamped))
    want = run_steer(x[:3], sae, rows)
    torch.testing.assert_close(got[:3], want, **FP32)
    assert torch.equal(got[3], x[3])
    assert not torch.allclose(got[:3], x[:3])  # the rows did steer
