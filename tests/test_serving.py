"""A request's journey without HTTP: `serving.prepare` against a real server state on the tiny
setup (model, SAE, registry and engine as `fsrl serve` loads them) builds the rows the contract
describes, refuses what only this server can judge with the field named, and queues nothing
when it refuses."""

from __future__ import annotations

import asyncio

import pytest

from fsrl.errors import NotFoundError
from fsrl.overrides import FeatureOverride
from fsrl.testing import write_tiny_setup
from server import serving
from server.errors import InvalidField
from server.params import GenerateParams
from server.settings import Settings
from server.state import load_state

CAP = 40


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    setup = write_tiny_setup(tmp_path_factory.mktemp("tiny"))
    state = load_state(Settings(model=str(setup.model_dir), sae=setup.sae_dir, adapters_dir=setup.adapters_dir,
                                device="cpu", max_new_tokens_cap=CAP, max_prompt_tokens=64))
    yield state
    state.close()


def prepare_and_run(state, params: GenerateParams) -> serving.GenerationOutcome:
    async def go():
        prepared = await serving.prepare(state, params)
        return await serving.run(state, prepared)
    return asyncio.run(go())


def test_compare_adds_a_base_row_with_no_steering_and_the_same_sampling(state):
    outcome = prepare_and_run(state, GenerateParams(
        prompt="the quick brown fox", adapter="tiny", steering_scale=2.0, compare=True, seed=3,
        features=(FeatureOverride(1, "add", 5.0),), max_new_tokens=6, ignore_eos=True))
    steered, base = outcome.prepared.job.requests
    assert steered.steering.adapter is not None and steered.steering.scale == 2.0
    assert steered.steering.overrides == (FeatureOverride(1, "add", 5.0),)
    assert base.steering.is_noop and base.sampling is steered.sampling and base.prompt_ids == steered.prompt_ids
    assert outcome.base is outcome.results[-1] and outcome.completion_tokens == 12


def test_n_rows_sample_with_seed_plus_j_and_generated_positions_start_after_the_prompt(state):
    outcome = prepare_and_run(state, GenerateParams(prompt="hello there", n=3, seed=10, temperature=0.9,
                                                    steer_positions="generated", max_new_tokens=2))
    requests = outcome.prepared.job.requests
    assert [r.sampling.seed for r in requests] == [10, 11, 12]
    assert all(r.steering.steer_from == len(r.prompt_ids) for r in requests)


def test_no_max_new_tokens_means_as_many_as_the_cap_allows(state):
    outcome = prepare_and_run(state, GenerateParams(prompt="hi", max_new_tokens=None, ignore_eos=True))
    assert outcome.prepared.job.requests[0].sampling.max_new_tokens == CAP
    assert outcome.steered.completion_tokens == CAP


@pytest.mark.parametrize("params, field", [
    (GenerateParams(prompt="hi", features=(FeatureOverride(10**6, "ablate"),), max_new_tokens=4), "features"),
    (GenerateParams(prompt="hi", max_new_tokens=CAP + 1), "max_new_tokens"),
    (GenerateParams(prompt="word " * 200, max_new_tokens=4), "prompt"),
    (GenerateParams(prompts=((0, 10**9),), max_new_tokens=4), "prompt"),
])
def test_what_only_this_server_can_judge_is_refused_naming_the_field_and_nothing_is_queued(state, params, field):
    with pytest.raises(InvalidField) as caught:
        asyncio.run(serving.prepare(state, params))
    assert caught.value.field == field
    assert state.engine.pending == 0


def test_an_unknown_adapter_is_refused_before_any_work(state):
    with pytest.raises(NotFoundError):
        serving.check(state, GenerateParams(prompt="hi", adapter="nope"))


def test_a_row_is_checked_once_against_the_served_sae(state):
    outcome = prepare_and_run(state, GenerateParams(prompt="hi", features=(FeatureOverride(2, "set", 1.0),),
                                                    max_new_tokens=3))
    steering = outcome.prepared.job.requests[0].steering
    assert steering._checked_for == [state.sae.d_sae]  # checked when built; later checks read the kept answer
