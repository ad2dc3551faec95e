"""Every public SAE format fsrl reads (fsrl.sae_formats), each written the way its publisher
lays it out, and its encode/decode against that publisher's maths written here in float64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fsrl.errors import CorruptFileError, FsrlError
from fsrl.sae import load_sae
from fsrl.sae_formats import detect_format

D, M = 16, 32
g = torch.Generator().manual_seed(0)


def rand(*shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


X = torch.randn(5, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3


def assert_same(sae, f_ref: torch.Tensor, x_hat_ref: torch.Tensor) -> None:
    f = sae.encode(X.float()).double()
    assert (f - f_ref).abs().max() < 1e-5 and (f_ref > 0).any()
    assert (sae.decode(f.float()).double() - x_hat_ref).abs().max() < 1e-4


def test_gemma_scope_params_npz_loads_directly_and_reads_resid_post_of_its_layer(tmp_path):
    folder = tmp_path / "layer_7" / "width_16k" / "average_l0_40"
    folder.mkdir(parents=True)
    W_enc, W_dec, b_enc, b_dec, th = rand(D, M), rand(M, D), rand(M), rand(D), rand(M).abs()
    np.savez(folder / "params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy(), b_enc=b_enc.numpy(),
             b_dec=b_dec.numpy(), threshold=th.numpy())
    sae = load_sae(folder)
    pre = X @ W_enc.double() + b_enc.double()                      # no b_dec subtracted on input
    f = pre * (pre > th.double())
    assert_same(sae, f, f @ W_dec.double() + b_dec.double())
    assert detect_format(folder) == "gemma_scope" and str(sae.site_at()) == "blocks.7.hook_resid_post"


def test_a_gemma_scope_file_whose_path_names_no_layer_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D, M)), W_dec=np.zeros((M, D)), b_enc=np.zeros(M),
             b_dec=np.zeros(D), threshold=np.zeros(M))
    with pytest.raises(FsrlError, match="does not name its layer"):
        load_sae(tmp_path)


def gemma_scope_2(folder: Path, hook_out: str | None = None, **extra) -> dict:
    folder.mkdir(parents=True)
    t = {"w_enc": rand(D, M), "w_dec": rand(M, D), "b_enc": rand(M), "b_dec": rand(D), "threshold": rand(M).abs(),
         **extra}
    save_file(t, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "hf_hook_point_in": "model.layers.5.output",
        "hf_hook_point_out": hook_out or "model.layers.5.output", "width": M}))
    return t


def test_gemma_scope_2_reads_its_hf_hook_point(tmp_path):
    t = gemma_scope_2(tmp_path / "resid_post" / "layer_5_width_16k_l0_small")
    sae = load_sae(tmp_path / "resid_post" / "layer_5_width_16k_l0_small")
    pre = X @ t["w_enc"].double() + t["b_enc"].double()
    f = pre * (pre > t["threshold"].double())
    assert_same(sae, f, f @ t["w_dec"].double() + t["b_dec"].double())
    assert str(sae.site_at()) == "blocks.5.hook_resid_post"


@pytest.mark.parametrize("case", ["transcoder", "affine skip"])
def test_gemma_scope_2_transcoders_and_skip_connections_are_refused(tmp_path, case):
    if case == "transcoder":
        gemma_scope_2(tmp_path / "t", hook_out="model.layers.5.mlp.output")
    else:
        gemma_scope_2(tmp_path / "t", affine_skip_connection=rand(D, D))
    with pytest.raises(FsrlError, match="transcoder or an SAE with an affine skip"):
        load_sae(tmp_path / "t")


def sparsify_folder(root: Path, **cfg) -> tuple[Path, dict]:
    folder = root / "layers.3"
    folder.mkdir(parents=True)
    t = {"encoder.weight": rand(M, D), "encoder.bias": rand(M), "W_dec": rand(M, D), "b_dec": rand(D)}
    save_file(t, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 4, "num_latents": M,
                                                 "expansion_factor": 2, "normalize_decoder": True, **cfg}))
    return folder, t


def test_sparsify_reads_its_hookpoint_folder_with_b_dec_subtracted_and_top_k(tmp_path):
    folder, t = sparsify_folder(tmp_path)
    sae = load_sae(folder)
    pre = torch.relu((X - t["b_dec"].double()) @ t["encoder.weight"].double().T + t["encoder.bias"].double())
    top = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert_same(sae, f, f @ t["W_dec"].double() + t["b_dec"].double())
    assert str(sae.site_at()) == "blocks.3.hook_resid_post"


def test_a_sparsify_transcoder_is_refused(tmp_path):
    folder, _ = sparsify_folder(tmp_path, transcode=True)
    with pytest.raises(FsrlError, match="transcoder"):
        load_sae(folder)


def llama_scope_folder(root: Path, norm_in: float, norm_out: float, hook_out: str | None = None) -> tuple[Path, dict]:
    folder = root / "Llama3_1-8B-Base-L2R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    t = {"encoder.weight": rand(M, D), "encoder.bias": rand(M), "decoder.weight": rand(D, M), "decoder.bias": rand(D)}
    save_file(t, folder / "checkpoints" / "final.safetensors")
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": M, "hook_point_in": "blocks.2.hook_resid_post",
        "hook_point_out": hook_out or "blocks.2.hook_resid_post", "act_fn": "jumprelu",
        "jump_relu_threshold": 0.2, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out}}))
    return folder, t


def test_llama_scope_folds_its_dataset_norms_exactly(tmp_path):
    folder, t = llama_scope_folder(tmp_path, norm_in=7.0, norm_out=11.0)
    sae = load_sae(folder)
    c_in, c_out = math.sqrt(D) / 7.0, math.sqrt(D) / 11.0
    pre = (X * c_in) @ t["encoder.weight"].double().T + t["encoder.bias"].double()
    f = pre * (pre > 0.2)
    x_hat = (f @ t["decoder.weight"].double().T + t["decoder.bias"].double()) / c_out
    assert_same(sae, f, x_hat)
    assert str(sae.site_at()) == "blocks.2.hook_resid_post"


def test_a_llama_scope_transcoder_is_refused(tmp_path):
    folder, _ = llama_scope_folder(tmp_path, 7.0, 7.0, hook_out="blocks.2.hook_mlp_out")
    with pytest.raises(FsrlError, match="transcoder"):
        load_sae(folder)


def test_goodfire_pth_reads_with_weights_only_and_names_its_layer_from_the_file(tmp_path):
    state = {"encoder_linear.weight": rand(M, D), "encoder_linear.bias": rand(M),
             "decoder_linear.weight": rand(D, M), "decoder_linear.bias": rand(D)}
    torch.save(state, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    sae = load_sae(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    f = torch.relu(X @ state["encoder_linear.weight"].double().T + state["encoder_linear.bias"].double())
    assert_same(sae, f, f @ state["decoder_linear.weight"].double().T + state["decoder_linear.bias"].double())
    assert str(sae.site_at()) == "blocks.19.hook_resid_post"


def test_a_goodfire_file_holding_code_is_refused_not_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    torch.save({"encoder_linear.weight": Payload()}, tmp_path / "x-SAE-l3.pth")
    with pytest.raises(CorruptFileError, match="cannot read"):
        load_sae(tmp_path / "x-SAE-l3.pth")


def legacy_sae_lens(folder: Path, **cfg) -> dict:
    """sae-lens before 6.0: hook_name / activation_fn_str at the top of cfg.json."""
    folder.mkdir(parents=True)
    t = {"W_enc": rand(D, M), "b_enc": rand(M), "W_dec": rand(M, D), "b_dec": rand(D)}
    save_file(t, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": D, "d_sae": M, "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True,
        "normalize_activations": False, "model_name": "gpt2", "dtype": "float32", "device": "cpu", **cfg}))
    return t


def test_the_sae_lens_format_before_6_reads_its_top_level_keys(tmp_path):
    t = legacy_sae_lens(tmp_path / "s")
    sae = load_sae(tmp_path / "s")
    pre = (X - t["b_dec"].double()) @ t["W_enc"].double() + t["b_enc"].double()
    top = pre.topk(3, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert_same(sae, f, f @ t["W_dec"].double() + t["b_dec"].double())
    assert str(sae.site_at()) == "blocks.4.hook_resid_pre" and sae.info.model_name == "gpt2"


@pytest.mark.slow  # importing sae_lens takes seconds
def test_the_format_before_6_reads_as_sae_lens_itself_reads_it(tmp_path):
    from sae_lens import SAE

    legacy_sae_lens(tmp_path / "s")
    theirs, ours = SAE.load_from_disk(str(tmp_path / "s"), device="cpu"), load_sae(tmp_path / "s")
    x = X.float()
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-6)
        assert torch.allclose(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), atol=1e-6)
    assert theirs.cfg.metadata.hook_name == ours.info.hook_name == "blocks.4.hook_resid_pre"


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_per_token_normalisation_is_refused_with_the_reason(tmp_path, norm):
    legacy_sae_lens(tmp_path / "s", normalize_activations=norm)
    with pytest.raises(FsrlError, match="scales each token by its own norm"):
        load_sae(tmp_path / "s")


def test_a_missing_tensor_names_the_file(tmp_path):
    folder, t = sparsify_folder(tmp_path)
    del t["W_dec"]
    save_file(t, folder / "sae.safetensors")
    with pytest.raises(CorruptFileError, match=r"sae.safetensors: tensor\(s\) W_dec missing"):
        load_sae(folder)


def fill_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A hub cache laid out as huggingface_hub lays it: refs/main -> a snapshot of the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def test_a_registry_name_resolves_offline_from_a_filled_hub_cache(tmp_path, monkeypatch):
    source = tmp_path / "src" / "layer_12" / "width_16k" / "average_l0_82"
    source.mkdir(parents=True)
    W_enc = rand(D, M)
    np.savez(source / "params.npz", W_enc=W_enc.numpy(), W_dec=rand(M, D).numpy(), b_enc=rand(M).numpy(),
             b_dec=rand(D).numpy(), threshold=rand(M).abs().numpy())
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "google/gemma-scope-2b-pt-res",
                   {"layer_12/width_16k/average_l0_82/params.npz": (source / "params.npz").read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    sae = load_sae("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    assert torch.equal(sae.W_enc, W_enc) and str(sae.site_at()) == "blocks.12.hook_resid_post"


def test_a_registry_name_not_in_the_cache_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(FsrlError, match="not in the hub cache") as err:
        load_sae("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    assert "\n" not in str(err.value)


def test_an_unknown_release_is_one_line():
    with pytest.raises(FsrlError, match="no release 'no-such-release'"):
        load_sae("no-such-release/some-id")
