"""The shipped demo adapters: they load against the shipped SAE, and their READMEs are their
eval files rendered (so no figure in them was typed by hand)."""

from pathlib import Path

import pytest

from fsrl.adapter import load_adapter
from fsrl.demo.recipes import RECIPES, render_readme
from fsrl.sae import default_sae_dir, load_sae

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sae():
    return load_sae(default_sae_dir())


@pytest.mark.parametrize("adapter_id", sorted(RECIPES))
def test_shipped_adapter_loads_against_the_shipped_sae(sae, adapter_id):
    adapter = load_adapter(REPO / "adapters" / adapter_id, sae=sae, layer=sae.info.layer)
    assert adapter.id == adapter_id and adapter.config.training["steps"] > 0


@pytest.mark.parametrize("adapter_id", sorted(RECIPES))
def test_shipped_readme_is_rendered_from_the_eval_files(adapter_id):
    readme = (REPO / "adapters" / adapter_id / "README.md").read_text()
    assert readme == render_readme(RECIPES[adapter_id], REPO)
