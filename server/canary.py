"""The steering canary: before a server reports healthy, steering must be shown to happen.

Whatever the engine, runner or device, a steering path can go silent (a vLLM runner that never
calls fsrl's per-step hook, a hook on the wrong module, a bank nobody reads) and every answer
still looks like text. So at start the server sends probes through its own engine, the way a
request goes, and compares the prompt's log-probabilities with a reference computed here on the
host copy of the same weights, with the steering formula written out:

    clamp probe    `add` of `value` on feature j:   x' = x + value * W_dec[j]
    adapter probe  (when an adapter is loaded)       x' = x + d @ W_dec,  d = s v(x)
                                                     (clamped adapters: d = relu(f + v) - f)
    plain probe    no steering:                      x' = x

The engine must land near the steered reference, far from the plain one: error below a tenth of
the distance the steering moves the answer (a rule that holds in float32 and in bfloat16).
Otherwise the server refuses to start with one line naming the engine, the runner and the probe.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass

import torch

from fsrl.errors import FsrlError
from fsrl.generation import GenerationRequest
from fsrl.overrides import MAX_FEATURE_VALUE, FeatureOverride
from fsrl.sampling import SamplingParams
from fsrl.sites import attach
from fsrl.steering import RowSteering
from server.engine import EngineJob

log = logging.getLogger(__name__)

CANARY_TEXT = "The steering canary reads this sentence before the server says it is healthy."
MAX_ERROR_SHARE = 0.1  # of the distance the steering moves the log-probabilities


class CanaryFailed(FsrlError):
    """The engine's steering does not do what the steering maths says."""


@dataclass
class Probe:
    name: str
    steering: RowSteering
    push: object  # x (B, T, d_in) -> the reference's x' (None: unsteered)


def _prompt_logprobs(model, site, ids: list[int], push) -> torch.Tensor:
    handle = attach(model.layers, site, push) if push is not None else None
    try:
        with torch.inference_mode():
            logits = model.model(torch.tensor([ids], device=model.device)).logits[0].double()
    finally:
        if handle is not None:
            handle.remove()
    logp = logits.log_softmax(-1)[:-1]
    return logp.gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].cpu()


def probes(state, ids: list[int]) -> list[Probe]:
    """The clamp probe on the feature whose push moves the answer most visibly (the widest
    decoder row, at about the stream's own norm), and an adapter probe when one is loaded."""
    sae, base = state.sae, state.base
    W_dec = sae.W_dec.double()
    feature = int(W_dec.norm(dim=-1).argmax())
    with torch.inference_mode():
        x = base.activations(state.site, torch.tensor([ids]))[0, 1:].double()
    # The request bound holds for the probe too: an SAE with narrow decoder rows (a random one
    # on a GPU) would otherwise ask for a value no request may carry, and the probe is refused.
    value = min(float(x.norm(dim=-1).median() / W_dec[feature].norm()), MAX_FEATURE_VALUE)

    def add_push(x):
        return (x.double() + value * W_dec[feature].to(x.device)).to(x.dtype)

    found = [Probe(f"clamp (add {value:.3g} on feature {feature})",
                   RowSteering(overrides=(FeatureOverride(feature, "add", value),)), add_push)]
    entries = state.registry.entries()
    if entries:
        entry = entries[0]
        reference = copy.deepcopy(entry.adapter).double()  # the engine runs its own copy

        def adapter_push(x):
            xs = x.double()
            v = reference(xs.to(reference.W.device)).to(xs.device)
            d = v
            if reference.clamp_nonnegative:
                f = sae.encode(xs.to(sae.W_dec.dtype)).double()
                d = torch.relu(f + v) - f
            return (xs + d @ W_dec.to(xs.device)).to(x.dtype)

        found.append(Probe(f"adapter {entry.id!r}", RowSteering(adapter=state.registry.get(entry.id)),
                           adapter_push))
    return found


async def run_canary(state) -> None:
    """Raise `CanaryFailed` unless every probe through the engine lands on its reference."""
    ids = state.base.tokenizer(CANARY_TEXT)["input_ids"][:32]
    found = await asyncio.to_thread(probes, state, ids)
    requests = [GenerationRequest(ids, sampling=SamplingParams(max_new_tokens=1), prompt_logprobs=0)]
    requests += [GenerationRequest(ids, p.steering, SamplingParams(max_new_tokens=1), prompt_logprobs=0)
                 for p in found]
    results = await state.engine.generate(state.engine.submit(EngineJob(requests)))
    got = [torch.tensor([lp for lp, _ in r.prompt_logprobs], dtype=torch.float64) for r in results]
    plain, *wanted = await asyncio.to_thread(
        lambda: [_prompt_logprobs(state.base, state.site, ids, push) for push in [None, *(p.push for p in found)]])
    engine = describe_engine(state)
    unsteered_error = float((got[0] - plain).abs().max())
    for probe, engine_logp, want in zip(found, got[1:], wanted):
        moved = float((want - plain).abs().max())
        error = float((engine_logp - want).abs().max())
        log.info("steering canary, %s at %s: the reference moves log-probs by %.3g, the %s "
                 "is %.3g from it (%.3g unsteered)", probe.name, state.site, moved, engine, error, unsteered_error)
        if moved == 0.0 or max(error, unsteered_error) > MAX_ERROR_SHARE * moved:
            raise CanaryFailed(f"steering canary failed on the {engine}: the {probe.name} probe "
                               f"at {state.site} should move the prompt's log-probabilities by {moved:.3g}; "
                               f"the engine's answer is {error:.3g} away from that "
                               f"({float((engine_logp - plain).abs().max()):.3g} from the unsteered one, "
                               f"whose own error is {unsteered_error:.3g})")


def model_runner(state) -> str:
    """What runs the model's steps (what a silent steering depends on; /health says it)."""
    if state.settings.engine != "vllm":
        return "transformers eager"
    from fsrl.vllm_plugin import MODEL_RUNNER

    return f"vLLM {MODEL_RUNNER}"


def describe_engine(state) -> str:
    name = "transformers" if state.settings.engine != "vllm" else "vLLM"
    return f"{name} engine ({model_runner(state)}, {state.base.device})"
