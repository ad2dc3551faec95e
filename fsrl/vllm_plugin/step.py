"""Before each forward: which token belongs to which request, and each request's steering.

vLLM's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, which `CPUModelRunner`
subclasses) lays the step's tokens out request by request in `input_batch.req_ids` order;
request i owns tokens `query_start_loc[i]:query_start_loc[i + 1]` (`_prepare_inputs` has
filled `query_start_loc` by the time `execute_model` calls `_model_forward`). A request's
`SamplingParams` (and so its `extra_args`) is in `runner.requests[req_id].sampling_params`.

`install_runner_hook` wraps `GPUModelRunner._model_forward` (documented there as the method to
override for model execution) so that, when the runner's model is a steered one, the site's
buffers are written just before the forward. It is installed from the steered model's
constructor, so it only ever runs in a worker that built one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fsrl.overrides import Condition, FeatureOverride
from fsrl.steering import RowSteering
from fsrl.vllm_plugin import COUNTERS, EXTRA_ARGS_KEY


def row_steering(spec: dict | None, adapters: dict[str, Any]) -> RowSteering | None:
    """A request's `extra_args["fsrl"]` as a `RowSteering` (None: not steered)."""
    if not spec:
        return None
    adapter = spec.get("adapter")
    return RowSteering(adapter=adapters[adapter] if adapter is not None else None,
                       scale=float(spec.get("scale", 1.0)),
                       overrides=tuple(FeatureOverride(int(i), str(op), float(v), *map(_condition, when))
                                       for i, op, v, *when in spec.get("overrides", ())),
                       steer_from=int(spec.get("steer_from", 0)),
                       abort_when=tuple(map(_condition, spec.get("abort_when", ()))),
                       generated_from=int(spec.get("generated_from", 0)))


def _condition(c: list) -> Condition:
    index, comparison, threshold = c
    return Condition(int(index), str(comparison), float(threshold))


def prepare_step(site, runner) -> None:
    """Write `site`'s request table (for requests new to it) and token rows for this step."""
    batch = runner.input_batch
    n_reqs = batch.num_reqs
    req_ids = list(batch.req_ids[:n_reqs])
    starts = runner.query_start_loc.np[:n_reqs + 1]
    rows = site.request_rows
    for gone in set(rows) - set(req_ids):  # finished, or not scheduled this step: row freed
        site.table.set_row(rows.pop(gone), None)
    token_row = np.full(site.token_row.shape[0], site.empty_row, dtype=np.int64)
    for i, req_id in enumerate(req_ids):
        if req_id not in rows:
            extra = runner.requests[req_id].sampling_params.extra_args or {}
            steering = row_steering(extra.get(EXTRA_ARGS_KEY), site.adapters)
            if steering is None or steering.is_noop:
                continue
            free = min(set(range(site.empty_row)) - set(rows.values()))
            site.table.set_row(free, steering)
            rows[req_id] = free
        token_row[starts[i]:starts[i + 1]] = rows[req_id]
    site.token_row.copy_(torch.from_numpy(token_row))
    COUNTERS["steps"] += 1


def collect_token_captures(site, runner) -> None:
    """After the forward: for each request that asks (`extra_args["fsrl"]["return_features"]`
    or `"telemetry"`, with `"key"`) and samples a token this step (a prefill chunk that ends
    inside the prompt does not), keep what the graph captured at its last position, the one
    that predicts the token: `{"features": [(index, delta), ...] | None, "telemetry": {...} |
    None}` appended to `site.features[key]`, taken by the server through `fsrl_take_features`."""
    batch = runner.input_batch
    n_reqs = batch.num_reqs
    starts = runner.query_start_loc.np[:n_reqs + 1]
    wanted = []
    for i, req_id in enumerate(batch.req_ids[:n_reqs]):
        spec = (runner.requests[req_id].sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY) or {}
        k = int(spec.get("return_features", 0)) if site.capture_top else 0
        scheduled = int(starts[i + 1] - starts[i])
        if (k or spec.get("telemetry")) and batch.num_computed_tokens_cpu[i] + scheduled >= batch.num_prompt_tokens[i]:
            wanted.append((spec, int(starts[i + 1]) - 1, k))
    if not wanted:
        return
    at = torch.tensor([position for _, position, _ in wanted])
    indices, deltas = site.capture_index[at].tolist(), site.capture_delta[at].tolist()
    norms, pushed, passed = site.capture_norm[at].tolist(), site.capture_pushed[at].tolist(), site.capture_when[at].tolist()
    for n, ((spec, _, k), index, delta) in enumerate(zip(wanted, indices, deltas)):
        features = [(i, d) for i, d in zip(index[:k], delta[:k]) if d != 0.0] if k else None
        telemetry = None
        if spec.get("telemetry"):
            telemetry = {"norm": norms[n], "pushed": pushed[n], "kl": None,
                         "conditions": [o[0] for o, hit in zip(spec.get("overrides", ()), passed[n]) if hit]}
        site.features.setdefault(spec["key"], []).append({"features": features, "telemetry": telemetry})


def collect_fired(site, runner) -> None:
    """After the forward: for each request with `abort_when` whose condition passed at one of
    this step's (generated) positions, keep the first such feature and how many generated
    tokens the request keeps (those up to and including that position) under its key
    (`site.fired[key]`, taken by the server through `fsrl_take_fired`)."""
    batch = runner.input_batch
    n_reqs = batch.num_reqs
    starts = runner.query_start_loc.np[:n_reqs + 1]
    fired = None
    for i, req_id in enumerate(batch.req_ids[:n_reqs]):
        spec = (runner.requests[req_id].sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY) or {}
        if not spec.get("abort_when") or spec["key"] in site.fired:
            continue
        if fired is None:
            fired = site.capture_fired[:int(starts[n_reqs])].tolist()
        for j, feature in enumerate(fired[starts[i]:starts[i + 1]]):
            if feature >= 0:
                position = int(batch.num_computed_tokens_cpu[i]) + j
                site.fired[spec["key"]] = (feature, position - int(spec["generated_from"]) + 1)
                break


def install_runner_hook() -> None:
    """Wrap `GPUModelRunner._model_forward` once (idempotent) to call `prepare_step` first and
    collect the captures after."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_fsrl_wrapped", False):
        return

    def _model_forward(self, *args, **kwargs):
        model = getattr(self, "model", None)
        site = getattr(model, "fsrl_site", None) if model is not None else None
        if site is not None:
            prepare_step(site, self)
        out = original(self, *args, **kwargs)
        if site is not None:
            collect_token_captures(site, self)
            collect_fired(site, self)
        return out

    _model_forward._fsrl_wrapped = True
    GPUModelRunner._model_forward = _model_forward
