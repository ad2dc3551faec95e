"""Our SAE reader agrees with sae-lens, and Gemma Scope folders convert offline."""

import numpy as np
import pytest
import torch

from fsrl.testing import tiny_sae
from fsrl.errors import FsrlError
from fsrl.sae import convert_gemma_scope, layer_from_hook_name, load_sae, save_sae


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_reader_matches_sae_lens(tmp_path, architecture):
    from sae_lens import SAE

    sae = tiny_sae(architecture="relu" if architecture == "standard" else architecture)
    sae.architecture = architecture
    save_sae(sae, tmp_path)
    theirs = SAE.load_from_disk(str(tmp_path), device="cpu")
    ours = load_sae(tmp_path)
    x = torch.randn(5, sae.d_in) * 3
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    f = ours.encode(x)
    torch.testing.assert_close(ours.decode(f), theirs.decode(f), rtol=1e-5, atol=1e-5)
    assert ours.info.layer == 1


def test_gemma_scope_npz_converts_to_a_jumprelu_sae(tmp_path):
    rng = np.random.default_rng(0)
    d_in, d_sae = 16, 40
    params = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
              "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
              "b_enc": rng.normal(size=d_sae).astype(np.float32),
              "b_dec": rng.normal(size=d_in).astype(np.float32),
              "threshold": np.abs(rng.normal(size=d_sae)).astype(np.float32)}
    src = tmp_path / "layer_12" / "width_16k" / "average_l0_82"
    src.mkdir(parents=True)
    np.savez(src / "params.npz", **params)
    sae = load_sae(convert_gemma_scope(src, tmp_path / "out", layer=12))
    x = torch.randn(4, d_in)
    pre = x @ torch.from_numpy(params["W_enc"]) + torch.from_numpy(params["b_enc"])  # no b_dec on input
    want = pre * (pre > torch.from_numpy(params["threshold"]))
    torch.testing.assert_close(sae.encode(x), want)
    assert sae.info.layer == 12 and sae.architecture == "jumprelu"


def test_hook_names_give_the_layer():
    assert layer_from_hook_name("model.layers.14") == 14
    assert layer_from_hook_name("blocks.12.hook_resid_post") == 12
    assert layer_from_hook_name(None) is None


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FsrlError, match="not found"):
        load_sae(tmp_path / "nope")
