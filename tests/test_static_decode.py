"""Static-shape decoding: fixed row slots over a fixed-length cache, one compiled graph."""

import random

import pytest
import torch
from fsrl.testing import tiny_adapter, tiny_base, tiny_model, tiny_sae

from fsrl.adapter import RowAdapters
from fsrl.errors import FsrlError
from fsrl.generation import GenerationRequest, Generator
from fsrl.sampling import SamplingParams
from fsrl.static_decode import StaticDecoder, use_static_decode
from fsrl.overrides import FeatureOverride
from fsrl.steering import RowSteering

LAYER = 1


def setup(n_layers: int = 4):
    base = tiny_base(n_layers=n_layers)
    sae = tiny_sae(layer=LAYER)
    adapters = [tiny_adapter(sae, base, "a", seed=1),
                tiny_adapter(sae, base, "b", seed=2, activation="soft_threshold",
                             clamp_nonnegative=True)]
    return Generator(base, sae, LAYER), adapters


def mixed_requests(adapters, count: int, seed: int = 0) -> list[GenerationRequest]:
    """Prompts of 2-11 tokens, adapters, scales, overrides, steered prompts or not, greedy
    and seeded sampling, features asked for."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(3, 100) for _ in range(rng.randrange(2, 12))]
        overrides = (FeatureOverride(5, "set", 3.0), FeatureOverride(7, "ablate")) if i % 4 == 1 else ()
        steering = RowSteering([*adapters, None][i % 3], [1.0, 2.0, 0.5][i % 3], overrides,
                               steer_from=len(prompt) if i % 2 else 0)
        sampling = SamplingParams(max_new_tokens=rng.randrange(3, 14), seed=i, ignore_eos=True,
                                  temperature=0.8 if i % 5 == 2 else 0.0)
        requests.append(GenerationRequest(prompt, steering, sampling, return_features=4 if i == 3 else 0))
    return requests


def run_joining_at_random(batch, requests, seed: int = 1) -> dict[int, list]:
    """Rows join at random steps while others run; each request's events by its index."""
    rng = random.Random(seed)
    events = {i: [] for i in range(len(requests))}
    waiting = list(range(len(requests)))
    for _ in range(500):
        if not waiting and not len(batch):
            return events
        while waiting and batch.can_join and rng.random() < 0.6:
            i = waiting.pop(0)
            for owner, event in batch.add([requests[i]], [i]):
                events[owner].append(event)
        for owner, event in batch.step():
            events[owner].append(event)
    raise AssertionError("the batch did not finish in 500 steps")


def count_moves(decoder: StaticDecoder) -> dict[str, int]:
    moves = {"left": 0, "right": 0}
    shift = decoder.shift

    def counting(start, end, delta):
        if start < end and delta:
            moves["left" if delta < 0 else "right"] += 1
        return shift(start, end, delta)
    decoder.shift = counting
    return moves


def test_rows_joining_at_random_equal_each_request_run_alone():
    gen, adapters = setup()
    requests = mixed_requests(adapters, 10)
    alone = [gen.generate([r])[0] for r in requests]
    decoder = use_static_decode(gen, rows=4, columns=30, compile=False)
    moves = count_moves(decoder)
    events = run_joining_at_random(gen.batch(), requests)
    for request, result in zip(requests, alone):
        got = events[requests.index(request)]
        assert [e.token_id for e in got] == result.token_ids
        assert got[-1].text == result.text
        if request.return_features:
            for mine, theirs in zip([e.features for e in got], result.features):
                assert [i for i, _ in mine] == [i for i, _ in theirs]
                assert [d for _, d in mine] == pytest.approx([d for _, d in theirs], rel=1e-4)
    assert moves["left"] > 0 and moves["right"] > 0  # both moves ran in this mix


def test_a_dropped_row_leaves_and_the_others_go_on():
    gen, adapters = setup()
    requests = mixed_requests(adapters, 3)
    alone = [gen.generate([r])[0] for r in requests]
    use_static_decode(gen, rows=4, columns=40, compile=False)
    batch = gen.batch()
    owners = ["keep", "drop", "keep2"]
    events = {o: [] for o in owners}
    for owner, event in batch.add(requests, owners):
        events[owner].append(event)
    assert batch.drop("drop") == 1 and len(batch) == 2
    while len(batch):
        for owner, event in batch.step():
            events[owner].append(event)
    assert [e.token_id for e in events["keep"]] == alone[0].token_ids
    assert [e.token_id for e in events["keep2"]] == alone[2].token_ids
    assert len(events["drop"]) == 1  # only its first token, from the prefill


def test_a_request_that_does_not_fit_the_cache_is_refused_and_changes_nothing():
    gen, adapters = setup()
    fits = GenerationRequest([5, 6, 7], RowSteering(adapters[0]), SamplingParams(max_new_tokens=8, ignore_eos=True))
    expected = gen.generate([fits])[0].token_ids  # eager, before the static decoder
    use_static_decode(gen, rows=2, columns=16, compile=False)
    batch = gen.batch()
    first = [e.token_id for _, e in batch.add([fits])]
    too_long = GenerationRequest(list(range(3, 13)), RowSteering(), SamplingParams(max_new_tokens=7))
    with pytest.raises(FsrlError, match="do not fit in the static cache's 16 columns"):
        batch.add([too_long])
    assert len(batch) == 1
    with pytest.raises(RuntimeError, match="2 rows cannot join: 1 slots are free"):
        batch.add([fits, fits])
    tokens = [e.token_id for _ in range(7) for _, e in batch.step()]
    assert first + tokens == expected and len(batch) == 0


def test_a_newer_batch_takes_the_slots_from_an_older_one():
    gen, adapters = setup()
    use_static_decode(gen, rows=2, columns=16, compile=False)
    old = gen.batch()
    old.add(mixed_requests(adapters, 1), ["mine"])
    gen.batch()
    for use in (old.step, lambda: old.drop("mine")):
        with pytest.raises(RuntimeError, match="newer batch"):
            use()


def test_empty_slots_stay_at_position_zero():
    gen, adapters = setup()
    decoder = use_static_decode(gen, rows=3, columns=32, compile=False)
    batch = gen.batch()
    request = GenerationRequest([5, 6, 7], RowSteering(), SamplingParams(max_new_tokens=10, ignore_eos=True))
    batch.add([request])
    for _ in range(5):
        batch.step()
    # A model with a learned position table would index past it if empty slots counted on.
    assert decoder.positions[:, 0].tolist() == [3 + 5, 0, 0]


def test_row_adapters_compute_what_each_rows_adapter_computes():
    gen, adapters = setup()
    rows = RowAdapters(3, gen.sae.d_in, gen.sae.d_sae)
    for b, adapter in enumerate([*adapters, None]):
        rows.set_row(b, adapter)
    x = torch.randn(3, 5, gen.sae.d_in)
    v = rows(x)
    for b, adapter in enumerate(adapters):
        torch.testing.assert_close(v[b], adapter(x[b]))
    assert v[2].abs().max() == 0


def test_a_model_with_sliding_window_layers_is_refused():
    gen, _ = setup()
    model = tiny_model(n_layers=4)
    model.config.sliding_window = 8
    model.config.layer_types = ["sliding_attention"] * 4
    gen.base.model = model
    with pytest.raises(FsrlError, match="sliding windows"):
        StaticDecoder(gen, rows=2, columns=16, compile=False)


@pytest.mark.slow  # torch.compile
def test_compiled_step_is_one_graph_for_every_mix_and_matches_each_request_alone():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen, adapters = setup(n_layers=2)
    requests = mixed_requests(adapters, 8, seed=3)
    alone = [gen.generate([r])[0] for r in requests]
    moves = count_moves(use_static_decode(gen, rows=4, columns=30, compile=True))
    events = run_joining_at_random(gen.batch(), requests, seed=4)
    for i, result in enumerate(alone):
        assert [e.token_id for e in events[i]] == result.token_ids
        if requests[i].return_features:
            assert [[f for f, _ in e.features] for e in events[i]] == \
                [[f for f, _ in step] for step in result.features]
    assert moves["left"] > 0 and moves["right"] > 0
    # Adapters, scales, overrides and rows came and went; the step compiled once.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
