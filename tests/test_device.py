"""The steering's promises on every device this machine has: CUDA when there is one, the CPU
always (the bit-identical-logits promise lives only here). `make gpu-check` runs these (`-m cuda`) on a GPU machine; the CPU cases run in every
suite so that the GPU check cannot rot between GPU sessions."""

import asyncio
import copy

import pytest
import torch
from fsrl.sites import Site
from fsrl.testing import tiny_adapter, tiny_base, tiny_sae
from test_steering import reference_steer, run_steer

from fsrl.adapter import save_adapter
from fsrl.generation import GenerationRequest, Generator
from fsrl.sampling import SamplingParams
from fsrl.overrides import FeatureOverride
from fsrl.steering import RowSteering, SteeringBatch, SteeringHook

pytestmark = pytest.mark.cuda

LAYER = 1
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
# Relative error (Frobenius norm) allowed against the float64 reference: fp32 is exact up to
# rounding; bf16 keeps 8 bits of mantissa, so its products drift by a few parts in a thousand.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def on(device: str, dtype: torch.dtype, *modules):
    return [copy.deepcopy(m).to(device, dtype) for m in modules]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_steering_matches_the_float64_reference(device, dtype, architecture):
    sae, adapter = on(device, dtype, tiny_sae(architecture=architecture), tiny_adapter(tiny_sae()))
    x = (torch.randn(7, 64, generator=torch.Generator().manual_seed(3)) * 3).to(device, dtype)
    overrides = [FeatureOverride(3, "set", 8.0), FeatureOverride(11, "add", 2.5),
                 FeatureOverride(40, "scale", -1.5), FeatureOverride(5, "ablate"),
                 FeatureOverride(9, "unsteer")]
    got = run_steer(x[None], sae, [RowSteering(adapter, 0.7, overrides)])[0]
    # The reference reads the same (rounded) weights and input, and computes in float64.
    want = reference_steer(x.cpu(), *on("cpu", torch.float64, sae, adapter), 0.7, overrides, clamp=False)
    assert got.device.type == device and got.dtype == dtype
    assert relative_error(x, want) > 1e-2  # the steering moved the residual
    assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_of_a_mixed_batch_equal_each_row_alone(device, dtype):
    sae, a1, a2 = on(device, dtype, tiny_sae(), tiny_adapter(tiny_sae(), seed=1),
                     tiny_adapter(tiny_sae(), seed=2, activation="soft_threshold", clamp_nonnegative=True))
    rows = [RowSteering(a1, 1.0), RowSteering(None), RowSteering(a2, 2.0, [FeatureOverride(4, "set", 3.0)]),
            RowSteering(a1, -0.5, [FeatureOverride(4, "ablate"), FeatureOverride(200, "add", 1.0)])]
    x = (torch.randn(len(rows), 5, 64, generator=torch.Generator().manual_seed(5)) * 2).to(device, dtype)
    together = run_steer(x, sae, rows)
    for b, row in enumerate(rows):
        alone = run_steer(x[b:b + 1], sae, [row])[0]
        assert relative_error(together[b], alone.double().cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_unsteered_rows_give_bit_identical_logits(device):
    base = tiny_base()
    base.model.to(device)
    sae, adapter = on(device, torch.float32, tiny_sae(layer=LAYER), tiny_adapter(tiny_sae()))
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(6)).to(device)
    plain = base.model(input_ids=ids).logits
    hook = SteeringHook(base.layers, Site(LAYER), sae)
    try:
        batch = SteeringBatch.build([RowSteering(None), RowSteering(adapter), RowSteering(None)], sae.d_sae,
                                    device=device)
        with hook.steering(batch, torch.arange(9, device=device).expand(3, -1)):
            steered = base.model(input_ids=ids).logits
        outside = base.model(input_ids=ids).logits
    finally:
        hook.remove()
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[2], plain[2])
    assert not torch.allclose(steered[1], plain[1])
    assert torch.equal(outside, plain)


def device_generator(device: str) -> tuple[Generator, list]:
    base = tiny_base()
    base.model.to(device)
    sae = tiny_sae(layer=LAYER).to(device)
    adapters = [tiny_adapter(sae, base, "a", seed=1).to(device),
                tiny_adapter(sae, base, "b", seed=2, activation="soft_threshold").to(device)]
    return Generator(base, sae, LAYER), adapters


def greedy(prompt: list[int], steering: RowSteering, tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt, steering, SamplingParams(max_new_tokens=tokens, ignore_eos=True))


@pytest.mark.parametrize("device", DEVICES)
def test_a_steered_batch_generates_what_each_request_generates_alone(device):
    gen, (a, b) = device_generator(device)
    requests = [greedy([5, 6, 7, 8], RowSteering(a, 1.0)), greedy([9, 10], RowSteering(None)),
                greedy([11, 12, 13], RowSteering(b, 2.0, [FeatureOverride(4, "set", 3.0)])),
                greedy([14, 15, 16, 17, 18], RowSteering(a, -1.0))]
    together = gen.generate(requests)
    alone = [gen.generate([r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[0].token_ids != gen.generate([greedy([5, 6, 7, 8], RowSteering(None))])[0].token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_a_hot_swap_leaves_running_rows_on_their_weights(device, tmp_path):
    from server.registry import AdapterRegistry

    gen, (a, b) = device_generator(device)
    for folder, adapter in (("a", a), ("more/b", b)):
        save_adapter(copy.deepcopy(adapter).cpu(), tmp_path / folder)
    registry = AdapterRegistry(tmp_path, gen.sae, LAYER, gen.base.fingerprint,
                               torch.device(device), torch.float32)
    registry.load_directory()
    prompt = [5, 6, 7, 8]
    on_a, on_b = (gen.generate([greedy(prompt, RowSteering(x))])[0].token_ids for x in (a, b))
    assert on_a != on_b
    batch = gen.batch()
    tokens = [e.token_id for _, e in batch.add([greedy(prompt, RowSteering(registry.get("a")))])]
    tokens += [e.token_id for _ in range(3) for _, e in batch.step()]
    asyncio.run(registry.load("a", "more/b", replace=True))
    while len(batch):
        tokens += [e.token_id for _, e in batch.step()]
    assert tokens == on_a  # the running row finished on the weights it started with
    assert registry.get("a").W.device.type == device
    assert gen.generate([greedy(prompt, RowSteering(registry.get("a")))])[0].token_ids == on_b


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_whose_output_overflows_fails_alone(device):
    gen, (a, _) = device_generator(device)
    blown = copy.deepcopy(a)
    with torch.no_grad():
        blown.W.fill_(1e38)  # v overflows to inf: that row's logits are not finite
    requests = [greedy([5, 6, 7, 8], RowSteering(a, 1.0)), greedy([9, 10, 11], RowSteering(blown, 1.0)),
                greedy([12, 13], RowSteering(None))]
    together = gen.generate(requests)
    assert together[1].finish_reason == "error" and "not finite" in together[1].error
    for request, result in zip(requests[::2], together[::2]):
        assert result.finish_reason == "length" and result.token_ids == gen.generate([request])[0].token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_steered_models_log_softmax(device):
    gen, (a, _) = device_generator(device)
    prompt = [5, 6, 7, 8, 9]
    request = GenerationRequest(prompt, RowSteering(a, 1.0), SamplingParams(max_new_tokens=3, ignore_eos=True),
                                logprobs=2, prompt_logprobs=2)
    result = gen.generate([request])[0]
    ids = prompt + result.token_ids
    hook = SteeringHook(gen.base.layers, Site(LAYER), gen.sae)  # the same steering, over the whole text
    try:
        batch = SteeringBatch.build([RowSteering(a, 1.0)], gen.sae.d_sae, device=device)
        with torch.no_grad(), hook.steering(batch, torch.arange(len(ids), device=device)[None]):
            logp = gen.base.model(input_ids=torch.tensor([ids], device=device)).logits[0].float().log_softmax(-1)
    finally:
        hook.remove()
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    got = [lp for lp, _ in result.prompt_logprobs] + [lp for lp, _ in result.logprobs]
    assert got == pytest.approx(want, abs=1e-4)
    for lp, top in result.logprobs:  # greedy: the chosen token is the top one
        assert len(top) == 2 and lp == top[0][1]


SLOT_PATTERNS = {"mixed, unused slots, unsteered tokens": [5, 0, -1, 5, 5, -1, 0, 2, 2, 7, 0, -1, 5, 2, 2, 0],
                 "one slot": [3] * 16, "none steered": [-1] * 16, "each its own": list(range(8)) * 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
def test_the_grouped_bank_product_gives_each_token_its_own_slots_product(device, pattern):
    """`grouped_slot_matmul` (the bank's kernel on a GPU, bf16) against the float64 product of
    each token with its own slot, and against every slot on every token (the form it replaces)."""
    from fsrl.adapter import every_slot_matmul, grouped_slot_matmul

    g = torch.Generator().manual_seed(7)
    W = (torch.randn(8, 64, 96, generator=g) / 8).to(device, torch.bfloat16)
    x = torch.randn(16, 64, generator=g).to(device, torch.bfloat16)
    slot = torch.tensor(SLOT_PATTERNS[pattern], device=device)
    want = torch.stack([torch.zeros(96, dtype=torch.float64) if k < 0 else x[n].double().cpu() @ W[k].double().cpu()
                        for n, k in enumerate(slot.tolist())])
    got, every = grouped_slot_matmul(x, W, slot), every_slot_matmul(x, W, slot)
    assert got.shape == (16, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, every, atol=2e-2, rtol=2e-2)
    assert torch.equal(got[slot < 0], torch.zeros_like(got[slot < 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_bank_product_on_cuda_is_grouped_and_replays_in_a_cuda_graph():
    """On a GPU with a grouped GEMM the bank's op takes the grouped kernel, and a CUDA graph
    captured once follows the slots written into its input between replays (no host read of
    the slots baked into the capture)."""
    from fsrl.adapter import grouped_mm_fits, slot_matmul

    g = torch.Generator().manual_seed(8)
    W = (torch.randn(8, 64, 96, generator=g) / 8).to("cuda", torch.bfloat16)
    x = torch.randn(16, 64, generator=g).to("cuda", torch.bfloat16)
    assert grouped_mm_fits(x, W), torch.cuda.get_device_name()
    slot = torch.tensor(SLOT_PATTERNS["mixed, unused slots, unsteered tokens"], device="cuda")
    slot_matmul(x, W, slot)  # warm up outside the capture
    torch.cuda.synchronize()
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = slot_matmul(x, W, slot)
    for pattern in SLOT_PATTERNS.values():
        slot.copy_(torch.tensor(pattern, device="cuda"))
        graph.replay()
        want = torch.stack([torch.zeros(96, device="cuda") if k < 0 else x[n].float() @ W[k].float()
                            for n, k in enumerate(pattern)])
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
