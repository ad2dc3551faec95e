"""The steering canary (server/canary.py): a server whose steering is silently dropped, or lands
somewhere else, refuses to start with one line; a sound one starts and says what it measured."""

from __future__ import annotations

import logging

import pytest

from _server_fixtures import ServedClient
from fsrl.steering import SteeringHook
from server.app import create_app
from server.settings import Settings


def tiny_app(setup, **settings):
    return create_app(Settings(model=str(setup.model_dir), sae=setup.sae_dir, adapters_dir=setup.adapters_dir,
                               device="cpu", **settings))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fsrl.testing import write_tiny_setup

    return write_tiny_setup(tmp_path_factory.mktemp("tiny"))


def start_error(app) -> str:
    with pytest.raises(RuntimeError, match="did not start"):
        with ServedClient(app, start_timeout_s=60):
            pass
    return app.state.startup_error


def test_a_sound_server_passes_the_canary_with_both_probes(setup, caplog):
    with caplog.at_level(logging.INFO, logger="server.canary"), ServedClient(tiny_app(setup)) as client:
        assert client.get("/health").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "server.canary"]
    assert any("clamp (add" in line for line in lines) and any("adapter 'tiny'" in line for line in lines)


def test_an_sae_with_narrow_decoder_rows_starts_with_the_probe_inside_the_request_bound(setup, tmp_path, caplog):
    """The clamp probe's value is the stream's norm over the decoder row's: rows a million
    times narrower would ask for a value beyond what a request may carry (seen on a GPU)."""
    import shutil

    from safetensors.torch import load_file, save_file

    sae_dir = tmp_path / "narrow-sae"
    shutil.copytree(setup.sae_dir, sae_dir)
    weights = load_file(sae_dir / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"] * 1e-6
    save_file(weights, sae_dir / "sae_weights.safetensors")
    app = create_app(Settings(model=str(setup.model_dir), sae=str(sae_dir), adapters_dir=setup.adapters_dir,
                              device="cpu"))
    with caplog.at_level(logging.INFO, logger="server.canary"), ServedClient(app) as client:
        assert client.get("/health").status_code == 200
    assert any("clamp (add 1e+04" in r.getMessage() for r in caplog.records if r.name == "server.canary")


def test_steering_silently_dropped_is_refused_at_start(setup, monkeypatch):
    monkeypatch.setattr(SteeringHook, "_steer", lambda self, hidden: None)
    message = start_error(tiny_app(setup))
    assert message.startswith("steering canary failed on the transformers engine (transformers eager, cpu)")
    assert "clamp" in message and "blocks.1.hook_resid_post" in message and "\n" not in message


def test_steering_one_layer_late_is_refused_at_start(setup, monkeypatch):
    from fsrl.sites import Site

    original = SteeringHook.__init__

    def one_layer_late(self, layers, site, sae):
        original(self, layers, Site(site.layer + 1, site.kind), sae)
    monkeypatch.setattr(SteeringHook, "__init__", one_layer_late)
    assert "steering canary failed" in start_error(tiny_app(setup))


def test_an_adapter_the_engine_does_not_read_is_refused_at_start(setup, monkeypatch):
    from fsrl import steering

    original = steering._adapter_pushes

    def no_adapter(xs, batch, d_sae, keep_v):
        d, v = original(xs, batch, d_sae, keep_v)
        return d * 0, v
    monkeypatch.setattr(steering, "_adapter_pushes", no_adapter)
    message = start_error(tiny_app(setup))
    assert "the adapter 'tiny' probe" in message
