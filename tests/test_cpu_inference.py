"""Linear layers packed for oneDNN: same outputs as nn.Linear, inference only."""

import pytest
import torch
from torch import nn

from fsrl.testing import tiny_adapter, tiny_base, tiny_sae
from fsrl.cpu_inference import (CHUNK_ROWS, ROW_STEP, SMALL_ROW_COUNTS, PackedLinear, can_pack,
                                pack_linear_layers)
from fsrl.generation import GenerationRequest, Generator
from fsrl.sampling import SamplingParams
from fsrl.steering import RowSteering

needs_onednn = pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(0, 48), (1, 48), (5, 48), (2, 7, 48), (257, 48), (300, 48), (3, 120, 48)])
def test_packed_linear_computes_what_nn_linear_computes(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = linear(x)
        got = PackedLinear(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_products_run_with_a_bounded_set_of_row_counts(monkeypatch):
    # oneDNN keeps a primitive per row count, and memory grew with every new one.
    product = torch.ops.mkldnn._linear_pointwise
    row_counts: set[int] = set()

    def spy(x, *args):
        row_counts.add(x.reshape(-1, x.shape[-1]).shape[0])
        return product(x, *args)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    layer = PackedLinear(nn.Linear(8, 4))
    with torch.inference_mode():
        for rows in range(1, 700):
            assert layer(torch.randn(rows, 8)).shape == (rows, 4)
    allowed = set(SMALL_ROW_COUNTS) | set(range(ROW_STEP, CHUNK_ROWS + 1, ROW_STEP))
    assert row_counts <= allowed and len(allowed) <= 17


@needs_onednn
def test_packed_linear_refuses_to_backpropagate():
    layer = PackedLinear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="inference"):
        layer(torch.randn(2, 8, requires_grad=True))


@needs_onednn
def test_pack_replaces_every_linear_and_keeps_the_logits():
    base = tiny_base()
    linears = sum(type(m) is nn.Linear for m in base.model.modules())
    ids = torch.tensor([[5, 9, 14, 3, 30, 41]])
    with torch.inference_mode():
        before = base.model(input_ids=ids).logits
    assert pack_linear_layers(base.model) == linears > 0
    assert not any(type(m) is nn.Linear for m in base.model.modules())
    with torch.inference_mode():
        after = base.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_packed_model_generates_the_same_steered_and_unsteered_text():
    sae = tiny_sae(layer=1)
    plain, packed = Generator(tiny_base(), sae, 1), Generator(tiny_base(), sae, 1)
    pack_linear_layers(packed.base.model)
    adapter = tiny_adapter(sae, plain.base)
    prompt = plain.base.tokenizer("hello there")["input_ids"]
    requests = [GenerationRequest(prompt, steering, SamplingParams(max_new_tokens=12, ignore_eos=True))
                for steering in (RowSteering(adapter, 3.0), RowSteering())]
    expected = [r.token_ids for r in plain.generate(requests)]
    assert [r.token_ids for r in packed.generate(requests)] == expected
    assert expected[0] != expected[1]  # the steering did something


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_pack_leaves_other_dtypes_alone(dtype):
    model = nn.Sequential(nn.Linear(8, 8)).to(dtype)
    assert not can_pack(model) and pack_linear_layers(model) == 0
    assert type(model[0]) is nn.Linear


def test_model_thread_holds_torchs_threads_and_gives_them_back():
    import threading

    from server.model_thread import ModelThread

    before = torch.get_num_threads()
    model_thread = ModelThread()
    try:
        assert model_thread.call(torch.get_num_threads) == before
        assert model_thread.call(threading.current_thread) is not threading.current_thread()
        assert torch.get_num_threads() == 1  # this thread now runs torch on one thread
        with pytest.raises(ZeroDivisionError):
            model_thread.call(lambda: 1 / 0)
        assert model_thread.call(lambda: 6 * 7) == 42  # still serving after an error
    finally:
        model_thread.close()
    assert torch.get_num_threads() == before


@needs_onednn
@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_packed_sae_and_adapter_steer_as_the_plain_ones(architecture, monkeypatch):
    from fsrl.overrides import FeatureOverride
    from fsrl.steering import SteeringBatch, steer

    sae = tiny_sae(architecture=architecture)
    adapter = tiny_adapter(sae, tiny_base())
    overrides = [FeatureOverride(3, "set", 4.0), FeatureOverride(9, "scale", 2.0),
                 FeatureOverride(20, "ablate")]
    rows = [RowSteering(adapter, 2.0), RowSteering(adapter, 1.0, overrides),
            RowSteering(None, 1.0, overrides)]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    positions = torch.arange(5).expand(3, 5)

    def run():
        with torch.inference_mode():
            batch = SteeringBatch.build(rows, sae.d_sae)
            return steer(x, sae, batch, positions, keep_delta=True), sae.encode(x), adapter(x)

    expected = run()
    assert sae.pack_for_cpu() and adapter.pack_for_cpu()
    product, packed_calls = torch.ops.mkldnn._linear_pointwise, []

    def spy(*args):
        packed_calls.append(id(args[1]))  # the packed weight it multiplied with
        return product(*args)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    got = run()
    # The packed products ran: the adapter's, the SAE encoder's and the decoder's.
    assert {id(adapter.packed.weight), id(sae.packed_encoder.weight),
            id(sae.packed_decoder.weight)} <= set(packed_calls)
    (steered, f, v), (steered_plain, f_plain, v_plain) = got, expected
    for a, b in [(steered.x, steered_plain.x), (steered.delta, steered_plain.delta), (f, f_plain),
                 (v, v_plain)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_packed_adapter_still_trains_through_its_weights():
    sae = tiny_sae()
    adapter = tiny_adapter(sae, tiny_base()).requires_grad_(True)
    assert adapter.pack_for_cpu()
    adapter(torch.randn(4, 64)).sum().backward()
    assert adapter.W.grad is not None and adapter.W.grad.abs().sum() > 0
