"""Every public SAE format fsrl reads (fsrl.sae_formats), each written the way its publisher
lays it out, and its encode/decode against that publisher's maths written here in float64."""

from __future__ import annotations

import io
import json
import math
import re
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


@pytest.mark.parametrize("case", ["transcoder", "wider output", "affine skip"])
def test_gemma_scope_2_transcoders_and_skip_connections_are_refused(tmp_path, case):
    if case == "transcoder":
        gemma_scope_2(tmp_path / "t", hook_out="model.layers.5.mlp.output")
    elif case == "wider output":
        gemma_scope_2(tmp_path / "t", w_dec=rand(M, D + 4))
    else:
        gemma_scope_2(tmp_path / "t", affine_skip_connection=rand(D, D))
    with pytest.raises(FsrlError, match="is not one residual site fsrl can steer"):
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
    with pytest.raises(FsrlError, match="is not one residual site fsrl can steer"):
        load_sae(folder)


def llama_scope_folder(root: Path, norm_in: float, norm_out: float, hook_out: str | None = None,
                       unit_decoder: bool = False) -> tuple[Path, dict]:
    """Laid out as fnlp/Llama3_1-8B-Base-LXR-8x; its decoder columns are not unit norm (the
    published ones average ~1.54) unless asked."""
    folder = root / "Llama3_1-8B-Base-L2R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    dec_w = rand(D, M)
    dec_w = dec_w / dec_w.norm(dim=0) * (1.0 if unit_decoder else 0.5 + 2 * torch.rand(M, generator=g))
    t = {"encoder.weight": rand(M, D), "encoder.bias": rand(M), "decoder.weight": dec_w, "decoder.bias": rand(D)}
    save_file(t, folder / "checkpoints" / "final.safetensors")
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": M, "hook_point_in": "blocks.2.hook_resid_post",
        "hook_point_out": hook_out or "blocks.2.hook_resid_post", "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": 0.2,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
        "sparsity_include_decoder_norm": True, "top_k": 50}))
    return folder, t


def lm_saes_loader(t: dict, c_in: float, c_out: float, theta: float = 0.2):
    """The publisher's own loader (lm-saes SparseAutoEncoder.from_config at the Llama Scope
    release), step by step on the file's tensors: -> (f, x_hat) for X."""
    W_E, b_E = t["encoder.weight"].double(), t["encoder.bias"].double()
    W_D, b_D = t["decoder.weight"].double(), t["decoder.bias"].double()
    b_E, b_D, W_D = b_E / c_in, b_D / c_out, W_D * c_in / c_out      # dataset-wise norms into the weights
    n = W_D.norm(dim=0)                                               # sparsity_include_decoder_norm:
    W_D, W_E, b_E = W_D / n, W_E * n[:, None], b_E * n                #   unit decoder columns
    pre = X @ W_E.T + b_E
    f = pre.where(pre > theta, torch.zeros_like(pre))                 # jumprelu
    return f, f @ W_D.T + b_D


def test_llama_scope_encodes_and_decodes_as_its_publishers_loader_does(tmp_path):
    folder, t = llama_scope_folder(tmp_path, norm_in=7.0, norm_out=11.0)
    sae = load_sae(folder)
    f, x_hat = lm_saes_loader(t, c_in=math.sqrt(D) / 7.0, c_out=math.sqrt(D) / 11.0)
    assert_same(sae, f, x_hat)
    assert str(sae.site_at()) == "blocks.2.hook_resid_post"


@pytest.mark.slow  # importing sae_lens takes seconds
def test_llama_scope_by_registry_name_agrees_with_sae_lens_where_decoder_columns_are_unit(tmp_path, monkeypatch):
    from sae_lens import SAE

    # llama_scope_lxr_8x / l0r_8x in sae-lens's registry: norm_scaling_factor 58.935251798561154
    norm = math.sqrt(D) / 58.935251798561154
    folder, _ = llama_scope_folder(tmp_path / "src", norm, norm, unit_decoder=True)
    files = {f"Llama3_1-8B-Base-L0R-8x/{p.relative_to(folder)}": p.read_bytes()
             for p in folder.rglob("*") if p.is_file()}
    offline_hub(tmp_path / "hub", monkeypatch, "fnlp/Llama3_1-8B-Base-LXR-8x", files)
    ours = load_sae("llama_scope_lxr_8x/l0r_8x")
    theirs = SAE.from_pretrained("llama_scope_lxr_8x", "l0r_8x", device="cpu", dtype="float32")
    x = X.float() * norm
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert torch.equal(f_ours > 0, f_theirs > 0) and (f_ours > 0).any()
        assert torch.allclose(ours.decode(f_ours), theirs.decode(f_theirs), atol=1e-5)


def test_a_llama_scope_transcoder_is_refused(tmp_path):
    folder, _ = llama_scope_folder(tmp_path, 7.0, 7.0, hook_out="blocks.2.hook_mlp_out")
    with pytest.raises(FsrlError, match="is not one residual site fsrl can steer"):
        load_sae(folder)


def test_goodfire_pth_reads_with_weights_only_and_names_its_layer_from_the_file(tmp_path):
    state = {"encoder_linear.weight": rand(M, D), "encoder_linear.bias": rand(M),
             "decoder_linear.weight": rand(D, M), "decoder_linear.bias": rand(D)}
    torch.save(state, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    sae = load_sae(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    f = torch.relu(X @ state["encoder_linear.weight"].double().T + state["encoder_linear.bias"].double())
    assert_same(sae, f, f @ state["decoder_linear.weight"].double().T + state["decoder_linear.bias"].double())
    assert str(sae.site_at()) == "blocks.19.hook_resid_post"


def goodfire_state() -> dict:
    return {"encoder_linear.weight": rand(M, D), "encoder_linear.bias": rand(M),
            "decoder_linear.weight": rand(D, M), "decoder_linear.bias": rand(D)}


@pytest.mark.parametrize("name", ["Llama-3.3-70B-Instruct-SAE-l19.pt", "sae_layer19.pth", "sae-layer_19.pth"])
def test_goodfire_layer_spellings_in_the_file_name_name_resid_post(tmp_path, name):
    torch.save(goodfire_state(), tmp_path / name)
    assert str(load_sae(tmp_path / name).site_at()) == "blocks.19.hook_resid_post"


def test_a_goodfire_sidecar_names_the_hook_and_model(tmp_path):
    torch.save(goodfire_state(), tmp_path / "sae.pth")
    (tmp_path / "sae.json").write_text(json.dumps({"hook_name": "blocks.7.hook_resid_pre", "model_name": "m"}))
    sae = load_sae(tmp_path)
    assert str(sae.site_at()) == "blocks.7.hook_resid_pre" and sae.info.model_name == "m"


def test_a_goodfire_file_naming_no_layer_is_one_clear_error(tmp_path):
    torch.save(goodfire_state(), tmp_path / "sae.pth")
    with pytest.raises(FsrlError, match="does not name its layer"):
        load_sae(tmp_path / "sae.pth")


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


def test_a_sparsify_cfg_without_k_names_the_file(tmp_path):
    folder, _ = sparsify_folder(tmp_path, k=None)
    with pytest.raises(CorruptFileError, match=r"cfg.json: k None"):
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


def offline_hub(cache: Path, monkeypatch, repo_id: str, files: dict[str, bytes]) -> None:
    fill_hub_cache(cache, repo_id, files)
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


# gemma-scope-2b-pt-{mlp,att}-canonical's layer_3/width_16k/canonical in sae-lens's registry
@pytest.mark.parametrize(("repo", "rel", "hook"), [
    ("mlp", "layer_3/width_16k/average_l0_95", "blocks.3.hook_mlp_out"),
    ("att", "layer_3/width_16k/average_l0_117", "blocks.3.attn.hook_z")])
def test_gemma_scope_mlp_and_att_saes_are_refused_not_read_as_the_residual_stream(tmp_path, monkeypatch, repo,
                                                                                   rel, hook):
    buf = io.BytesIO()
    np.savez(buf, W_enc=np.zeros((D, M)), W_dec=np.zeros((M, D)), b_enc=np.zeros(M), b_dec=np.zeros(D),
             threshold=np.zeros(M))
    offline_hub(tmp_path / "hub", monkeypatch, f"google/gemma-scope-2b-pt-{repo}",
                {f"{rel}/params.npz": buf.getvalue()})
    with pytest.raises(FsrlError, match=re.escape(hook)):
        load_sae(f"gemma-scope-2b-pt-{repo}-canonical/layer_3/width_16k/canonical")


def test_a_registry_name_resolves_offline_from_a_filled_hub_cache(tmp_path, monkeypatch):
    source = tmp_path / "src" / "layer_12" / "width_16k" / "average_l0_82"
    source.mkdir(parents=True)
    W_enc = rand(D, M)
    np.savez(source / "params.npz", W_enc=W_enc.numpy(), W_dec=rand(M, D).numpy(), b_enc=rand(M).numpy(),
             b_dec=rand(D).numpy(), threshold=rand(M).abs().numpy())
    offline_hub(tmp_path / "hub", monkeypatch, "google/gemma-scope-2b-pt-res",
                {"layer_12/width_16k/average_l0_82/params.npz": (source / "params.npz").read_bytes()})
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
