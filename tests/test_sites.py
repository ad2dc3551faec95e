"""An SAE's site, read from its hook name in every public spelling (fsrl.sites)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fsrl.adapter import META_FILE, load_adapter, save_adapter
from fsrl.errors import MismatchError
from fsrl.generation import Generator
from fsrl.sae import SAE_CFG_FILE, load_sae, save_sae
from fsrl.testing.server_process import free_port
from fsrl.sites import Site, UnsteerableSiteError, attach, parse_hook_name
from fsrl.testing import tiny_adapter, tiny_base, tiny_sae, write_tiny_setup


@pytest.mark.parametrize("hook_name, site", [
    ("blocks.12.hook_resid_pre", Site(12, "resid_pre")),
    ("blocks.12.hook_resid_post", Site(12, "resid_post")),
    ("model.layers.12", Site(12, "resid_post")),             # transformers module output
    ("model.layers.5.output", Site(5, "resid_post")),        # Gemma Scope 2 hf_hook_point_in
    ("model.language_model.layers.7", Site(7, "resid_post")),  # Gemma 3 multimodal
    ("model.layers.3.input", Site(3, "resid_pre")),
    ("layers.12", Site(12, "resid_post")),                   # sparsify hookpoint
    ("transformer.h.4", Site(4, "resid_post")),              # GPT-2
    ("h.4", Site(4, "resid_post")),
    ("gpt_neox.layers.6", Site(6, "resid_post")),            # Pythia
])
def test_every_public_spelling_names_one_site(hook_name, site):
    assert parse_hook_name(hook_name) == site


@pytest.mark.parametrize("hook_name", [
    "blocks.3.hook_mlp_out", "blocks.3.hook_attn_out", "blocks.3.attn.hook_z", "blocks.3.hook_resid_mid",
    "blocks.3.ln2.hook_normalized", "model.layers.3.mlp", "layers.3.mlp", "blocks.3.hook_resid_post.hook_sae_acts",
    "hook_embed", "something else",
])
def test_a_site_that_is_not_the_residual_stream_at_a_layer_boundary_is_refused(hook_name):
    with pytest.raises(UnsteerableSiteError) as err:
        parse_hook_name(hook_name)
    message = str(err.value)
    assert "\n" not in message and repr(hook_name) in message
    assert "blocks.L.hook_resid_pre" in message and "blocks.L.hook_resid_post" in message


def test_an_sae_at_mlp_out_is_refused_when_it_loads(tmp_path):
    save_sae(tiny_sae(), tmp_path)
    cfg = json.loads((tmp_path / SAE_CFG_FILE).read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_mlp_out"
    (tmp_path / SAE_CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UnsteerableSiteError, match="hook_mlp_out"):
        load_sae(tmp_path)


def test_resid_pre_reads_the_input_of_its_layer_and_resid_post_its_output():
    base = tiny_base()
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        hidden = base.model(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0 out, ...]
    assert torch.equal(base.activations(Site(0, "resid_pre"), ids), hidden[0])
    assert torch.equal(base.activations(Site(2, "resid_pre"), ids), hidden[2])
    assert torch.equal(base.activations(Site(1, "resid_post"), ids), hidden[2])


def test_attach_replaces_the_stream_entering_a_layer():
    base = tiny_base()
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        plain = base.model(ids).logits
        handle = attach(base.layers, Site(0, "resid_pre"), lambda x: x * 0)
        zeroed = base.model(ids).logits
        handle.remove()
        again = base.model(ids).logits
    assert not torch.allclose(plain, zeroed) and torch.equal(plain, again)


def test_a_layer_override_keeps_the_saes_kind_of_site():
    sae = tiny_sae(layer=1)
    sae.info.site = Site(1, "resid_pre")
    generator = Generator(tiny_base(), sae, layer=2)
    assert generator.site == Site(2, "resid_pre") and generator.layer == 2


def test_an_adapter_made_at_another_site_is_refused(tmp_path):
    sae = tiny_sae(layer=1)
    save_adapter(tiny_adapter(sae, layer=1), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["site"] == "resid_post" and meta["format_version"] == 2
    (tmp_path / "a" / META_FILE).write_text(json.dumps({**meta, "site": "resid_pre"}))
    with pytest.raises(MismatchError, match=r"site \(adapter: resid_pre, served: resid_post\)"):
        load_adapter(tmp_path / "a", sae=sae, layer=1)


def test_a_version_1_adapter_without_a_site_was_made_at_resid_post(tmp_path):
    sae = tiny_sae(layer=1)
    save_adapter(tiny_adapter(sae, layer=1), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    del meta["site"]
    (tmp_path / "a" / META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    assert load_adapter(tmp_path / "a", sae=sae, layer=1).config.site == "resid_post"
    sae.info.site = Site(1, "resid_pre")
    with pytest.raises(MismatchError, match="site"):
        load_adapter(tmp_path / "a", sae=sae, layer=1)


@pytest.mark.slow
def test_serve_refuses_an_sae_at_mlp_out_in_one_line(tmp_path):
    setup = write_tiny_setup(tmp_path)
    cfg = json.loads((setup.sae_dir / SAE_CFG_FILE).read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_mlp_out"
    (setup.sae_dir / SAE_CFG_FILE).write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "fsrl.cli", "serve", "--model", str(setup.model_dir),
                           "--sae", str(setup.sae_dir), "--adapters-dir", str(setup.adapters_dir),
                           "--device", "cpu", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("fsrl: error:")]
    assert len(errors) == 1 and "'blocks.1.hook_mlp_out' is not a site fsrl can steer" in errors[0]
    assert "Traceback" not in done.stderr
