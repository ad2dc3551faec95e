"""Public SAE formats, read into one shape: a reader per format, one table (`READERS`), the
format told from the files on disk (`detect_format`), and sae-lens's registry of pretrained
SAEs for `RELEASE/SAE_ID` names (`resolve_release`).

Every reader returns `SaeWeights` in fsrl's maths (fsrl.sae):

    hidden_pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc    W_enc (d_in, d_sae)
    f          = activation(hidden_pre)                                relu | topk | jumprelu
    x_hat      = f @ W_dec + b_dec                                     W_dec (d_sae, d_in)

A publisher's constant input/output scaling is folded into the weights exactly (Llama Scope);
per-token normalisation and anything that is not an SAE on one residual site (transcoders,
skip connections) is refused with the reason, since `x + d @ W_dec` would not be what that
SAE decodes. Files are named in every message; nothing here downloads unless a registry name
asks for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fsrl.errors import CorruptFileError, FsrlError


@dataclass
class SaeWeights:
    W_enc: torch.Tensor                 # (d_in, d_sae)
    b_enc: torch.Tensor                 # (d_sae,)
    W_dec: torch.Tensor                 # (d_sae, d_in)
    b_dec: torch.Tensor                 # (d_in,)
    architecture: str                   # relu | standard | topk | jumprelu
    hook_name: str | None               # as the publisher spells it
    apply_b_dec_to_input: bool
    k: int | None = None
    threshold: torch.Tensor | None = None  # (d_sae,)
    name: str | None = None
    model_name: str | None = None

    def check(self, where: str) -> "SaeWeights":
        d_in, d_sae = self.W_enc.shape
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.threshold is not None:
            expected["threshold"] = (d_sae,)
        for key, shape in expected.items():
            if tuple(getattr(self, key).shape) != shape:
                raise CorruptFileError(f"{where}: {key} has shape {tuple(getattr(self, key).shape)}, "
                                       f"expected {shape}")
        if self.architecture == "jumprelu" and self.threshold is None:
            raise CorruptFileError(f"{where}: a jumprelu SAE needs a threshold")
        if self.architecture == "topk" and not self.k:
            raise CorruptFileError(f"{where}: a topk SAE needs k")
        return self


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {path}: {type(exc).__name__}") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except Exception as exc:  # safetensors raises its own types
        raise CorruptFileError(f"cannot read {path}: {exc}") from None


def _need(tensors: dict, keys: tuple[str, ...], where: Path) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CorruptFileError(f"{where}: tensor(s) {', '.join(missing)} missing")
    return [tensors[k] for k in keys]


def _layer_in(parts: list[str], pattern: str) -> int | None:
    """The layer the last of `parts` that matches `pattern` (its group 1) names."""
    for part in reversed(parts):
        m = re.fullmatch(pattern, part, re.IGNORECASE)
        if m:
            return int(m.group(1))
    return None


# ----------------------------------------------------------------------------------- readers

SAE_LENS_ACTIVATIONS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}


def read_sae_lens(folder: Path) -> SaeWeights:
    """sae-lens's folder: `cfg.json` + `sae_weights.safetensors`, the current format (keys
    under `metadata`) and the one before 6.0 (`hook_name`/`hook_point` at the top,
    `activation_fn_str`, boolean `normalize_activations`)."""
    cfg = _json(folder / "cfg.json")
    weights = _tensors(folder / "sae_weights.safetensors")
    where = folder / "sae_weights.safetensors"
    arch = cfg.get("architecture")
    if arch is None:  # before 6.0: the activation names it
        fn = cfg.get("activation_fn_str", "relu")
        if fn not in SAE_LENS_ACTIVATIONS:
            raise FsrlError(f"{folder}/cfg.json: activation_fn_str {fn!r} is not supported "
                            f"(fsrl reads {', '.join(SAE_LENS_ACTIVATIONS)})")
        arch = SAE_LENS_ACTIVATIONS[fn]
    if arch not in ("standard", "relu", "topk", "jumprelu"):
        raise FsrlError(f"{folder}/cfg.json: architecture {arch!r} is not supported "
                        "(fsrl reads standard, topk and jumprelu SAEs)")
    norm = cfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if norm not in ("none", "expected_average_only_in"):
        raise FsrlError(f"{folder}/cfg.json: normalize_activations={norm!r} scales each token by its "
                        "own norm, so a steering edit x + d @ W_dec is not what this SAE decodes; "
                        "fsrl reads SAEs without per-token normalisation")
    if cfg.get("reshape_activations", "none") not in ("none", None) or cfg.get("hook_head_index") is not None:
        raise FsrlError(f"{folder}/cfg.json: an SAE on per-head activations (hook_z) is not a "
                        "residual site fsrl can steer")
    if cfg.get("finetuning_scaling_factor"):
        raise FsrlError(f"{folder}/cfg.json: finetuning_scaling_factor is not supported")
    W_enc, b_enc, W_dec, b_dec = _need(weights, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    if cfg.get("rescale_acts_by_decoder_norm"):
        # Fold the decoder norms into the encoder: exact for reconstruction and top-k choice.
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    meta = cfg.get("metadata") or {}
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if (d_in, d_sae) != (None, None) and (int(d_in), int(d_sae)) != tuple(W_enc.shape):
        raise CorruptFileError(f"{where}: W_enc has shape {tuple(W_enc.shape)}, cfg.json says "
                               f"({d_in}, {d_sae})")
    return SaeWeights(W_enc, b_enc, W_dec, b_dec, arch,
                      hook_name=meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point"),
                      apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), k=k,
                      threshold=weights.get("threshold"),
                      name=meta.get("sae_name") or cfg.get("name"),
                      model_name=meta.get("model_name") or cfg.get("model_name"))


# Gemma Scope repo suffix -> the hook its SAEs read (as sae-lens names them); only -res is steerable.
GEMMA_SCOPE_HOOKS = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
                     "att": "blocks.{layer}.attn.hook_z"}


def read_gemma_scope(folder: Path) -> SaeWeights:
    """Gemma Scope (Gemma 2): `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU, no
    b_dec subtraction). The file does not name its hook: the `layer_L` of Gemma Scope's own
    layout (`layer_12/width_16k/average_l0_82/`) does, and `-res` SAEs read resid_post."""
    import numpy as np

    npz = folder / "params.npz"
    try:
        params = np.load(npz)
        names = {k.lower(): k for k in params.files}
        W_enc, W_dec, b_enc, b_dec, threshold = (torch.from_numpy(params[names[k]]).float()
                                                 for k in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"))
    except KeyError as exc:
        raise CorruptFileError(f"{npz}: array {exc} missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {npz}: {type(exc).__name__}") from None
    parts = list(folder.resolve().parts)
    layer = _layer_in(parts, r"layer_(\d+)")
    if layer is None:
        raise FsrlError(f"{npz} does not name its layer: keep Gemma Scope's layer_L/width_.../ folders, "
                        "or convert it with `fsrl sae convert-gemma-scope DIR OUT --layer L`")
    # The same layout serves three repos, google/gemma-scope-<model>-{res,mlp,att}; their name (kept
    # by the hub cache's models--google--gemma-scope-2b-pt-mlp/) says where the SAE reads. A folder
    # that names none is taken as -res, the residual stream.
    kinds = [m.group(1).lower() for part in parts
             if (m := re.search(r"gemma-scope-\w+-(?:pt|it)-(res|mlp|att)(?![a-z])", part, re.IGNORECASE))]
    hook = GEMMA_SCOPE_HOOKS[kinds[-1] if kinds else "res"].format(layer=layer)
    return SaeWeights(W_enc, b_enc, W_dec, b_dec, "jumprelu", hook,
                      apply_b_dec_to_input=False, threshold=threshold, name=f"gemma-scope-{folder.name}")


def read_gemma_scope_2(folder: Path) -> SaeWeights:
    """Gemma Scope 2 (Gemma 3): `params.safetensors` (w_enc, w_dec, b_enc, b_dec, threshold) +
    `config.json` (`architecture: jump_relu`, `hf_hook_point_in`, `hf_hook_point_out`)."""
    cfg = _json(folder / "config.json")
    where = folder / "params.safetensors"
    tensors = {k.lower(): v for k, v in _tensors(where).items()}
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out", cfg.get("hf_hook_point_in"))
    if hook_in != hook_out or "affine_skip_connection" in tensors:
        raise FsrlError(f"{folder}: a transcoder or an SAE with an affine skip connection (reads "
                        f"{hook_in}, writes {hook_out}) is not one residual site fsrl can steer")
    if cfg.get("architecture", "jump_relu") not in ("jump_relu", "jumprelu"):
        raise FsrlError(f"{folder}/config.json: architecture {cfg.get('architecture')!r} is not supported")
    W_enc, W_dec, b_enc, b_dec, threshold = _need(tensors, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), where)
    if W_dec.ndim == 2 and W_enc.ndim == 2 and W_dec.shape[1] != W_enc.shape[0]:
        raise FsrlError(f"{folder}: a transcoder (reads d_in {W_enc.shape[0]}, writes d_out {W_dec.shape[1]}) "
                        "is not one residual site fsrl can steer")
    return SaeWeights(W_enc, b_enc, W_dec, b_dec, "jumprelu", hook_in, apply_b_dec_to_input=False,
                      threshold=threshold, name=f"gemma-scope-2-{folder.name}", model_name=cfg.get("model_name"))


def read_sparsify(folder: Path) -> SaeWeights:
    """EleutherAI's sparsify: `<hookpoint>/cfg.json` + `sae.safetensors` (encoder.weight
    (M, d), encoder.bias, W_dec (M, d), b_dec). f = topk(relu((x - b_dec) W_e^T + b_e)),
    x_hat = f W_dec + b_dec. The folder's name is the hookpoint (`layers.12`)."""
    cfg = _json(folder / "cfg.json")
    where = folder / "sae.safetensors"
    tensors = _tensors(where)
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in tensors:
        raise FsrlError(f"{folder}: a sparsify transcoder or skip connection is not one residual "
                        "site fsrl can steer")
    if cfg.get("activation", "topk") != "topk":
        raise FsrlError(f"{folder}/cfg.json: activation {cfg.get('activation')!r} is not supported (topk)")
    if not isinstance(cfg.get("k"), int) or cfg["k"] < 1:
        raise CorruptFileError(f"{folder}/cfg.json: k {cfg.get('k')!r} is not a positive integer")
    enc_w, enc_b, W_dec, b_dec = _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    return SaeWeights(enc_w.T.contiguous(), enc_b, W_dec, b_dec, "topk", folder.name,
                      apply_b_dec_to_input=True, k=cfg["k"], name=f"sparsify-{folder.name}")


def read_llama_scope(folder: Path) -> SaeWeights:
    """Llama Scope (OpenMOSS lm-saes): `hyperparams.json` + `checkpoints/final.safetensors`
    (encoder.weight W_e (d_sae, d), encoder.bias b_e, decoder.weight W_d (d, d_sae), decoder.bias
    b_d), read as the publisher's own loader reads it (lm-saes `SparseAutoEncoder.from_config` at
    the release): with c_in, c_out = sqrt(d_model) / dataset_average_activation_norm.{in, out},

      1. "dataset-wise" norms into the weights, so the SAE takes raw activations:
         b_e / c_in, W_d c_in / c_out, b_d / c_out;
      2. sparsity_include_decoder_norm (lm-saes's default): unit decoder columns, their norms
         n_i = ||W_d[:, i]|| c_in / c_out moved into the encoder's row i and bias;
      3. act_fn jumprelu: f = pre where pre > jump_relu_threshold, on that model's
         pre-activations.

    Folded into fsrl's maths, exactly (s_i = n_i, or 1 without step 2):

        W_enc = W_e^T s      b_enc = b_e s / c_in      threshold = jump_relu_threshold (as is)
        W_dec = (W_d c_in / c_out / s)^T                 b_dec = b_d / c_out

    In the training space (pre_t = (c_in x) W_e^T + b_e) a feature fires when
    pre_t ||W_d[:, i]|| / c_out > theta, and x_hat = (f_t W_d^T + b_d) / c_out. So the threshold
    is not theta on pre_t: that gate lets far too many features through (sae-lens's "abnormally
    large L0", its PR #483). sae-lens since uses theta * c_in on pre_t, which is this gate only
    where the decoder columns have unit norm; the published ones do not (mean ~1.54 reported for
    L15R-8x), and fsrl follows the publisher's loader."""
    hp = _json(folder / "hyperparams.json")
    where = folder / "checkpoints" / "final.safetensors"
    tensors = _tensors(where)
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise FsrlError(f"{folder}: a transcoder (reads {hook_in}, writes {hook_out}) is not one "
                        "residual site fsrl can steer")
    if hp.get("act_fn", "jumprelu") != "jumprelu" or "jump_relu_threshold" not in hp:
        raise FsrlError(f"{folder}/hyperparams.json: act_fn {hp.get('act_fn')!r} is not supported "
                        "(fsrl reads Llama Scope's jumprelu with its jump_relu_threshold)")
    enc_w, enc_b, dec_w, dec_b = _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight",
                                                 "decoder.bias"), where)
    d_model = int(hp.get("d_model", enc_w.shape[1]))
    c_in = c_out = 1.0
    norm = hp.get("norm_activation", "dataset-wise")
    if norm == "dataset-wise":
        norms = hp.get("dataset_average_activation_norm") or {}
        if "in" not in norms:
            raise FsrlError(f"{folder}/hyperparams.json: dataset-wise norm without dataset_average_activation_norm")
        c_in = d_model ** 0.5 / float(norms["in"])
        c_out = d_model ** 0.5 / float(norms.get("out", norms["in"]))
    elif norm not in ("inference", "none", None):  # inference: the norms are in the weights already
        raise FsrlError(f"{folder}/hyperparams.json: norm_activation {norm!r} scales each token by its own "
                        "norm, not a constant fsrl can fold into the weights")
    scale = dec_w.norm(dim=0) * c_in / c_out if hp.get("sparsity_include_decoder_norm", True) \
        else torch.ones(enc_w.shape[0])                                                   # (d_sae,)
    threshold = torch.full((enc_w.shape[0],), float(hp["jump_relu_threshold"]))
    return SaeWeights(enc_w.T * scale, enc_b * scale / c_in, (dec_w * (c_in / c_out) / scale).T.contiguous(),
                      dec_b / c_out, "jumprelu", hook_in,
                      apply_b_dec_to_input=bool(hp.get("apply_decoder_bias_to_pre_encoder", False)),
                      threshold=threshold, name=f"llama-scope-{folder.name}", model_name=hp.get("model_name"))


def read_goodfire(path: Path) -> SaeWeights:
    """Goodfire: a `torch.save`d state dict (read with weights_only): encoder_linear (d_sae, d)
    and decoder_linear (d, d_sae) with biases; f = relu(x W_e^T + b_e), x_hat = f W_d^T + b_d.
    The file does not name its hook. A sidecar `<name>.json` beside it may ({"hook_name": ...,
    "model_name": ...}); otherwise its published name does (`...-SAE-l19.pth`, also `layer19`,
    `layer_19`: the residual stream after that layer)."""
    files = [path] if path.is_file() else sorted(path.glob("*.pt*"))
    if len(files) != 1:
        raise FsrlError(f"{path}: expected exactly one Goodfire .pth file, found {len(files)}")
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=True)
        enc_w, enc_b, dec_w, dec_b = (state[k].float() for k in (
            "encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"))
    except KeyError as exc:
        raise CorruptFileError(f"{files[0]}: tensor {exc} missing") from None
    except Exception as exc:  # torch.load's unpickler refuses anything but tensors
        raise CorruptFileError(f"cannot read {files[0]}: {type(exc).__name__}") from None
    sidecar = files[0].with_suffix(".json")
    side = _json(sidecar) if sidecar.exists() else {}
    hook = side.get("hook_name")
    if hook is None:
        layer = _layer_in([files[0].stem], r".*(?:^|[^a-z0-9])(?:l|layer)[_-]?(\d+)(?:[^0-9].*)?")
        if layer is None:
            raise FsrlError(f"{files[0]} does not name its layer: Goodfire's files end in -l<layer>; "
                            f"or write {sidecar.name} beside it with a hook_name")
        hook = f"blocks.{layer}.hook_resid_post"
    model = side.get("model_name") or (f"meta-llama/{files[0].stem.split('-SAE-')[0]}"
                                        if files[0].stem.startswith("Llama-") and "-SAE-" in files[0].stem else None)
    return SaeWeights(enc_w.T.contiguous(), enc_b, dec_w.T.contiguous(), dec_b, "standard", hook,
                      apply_b_dec_to_input=False, name=files[0].stem, model_name=model)


# Format name -> (reader, the file that tells it). Adding a format is adding a row and its test.
READERS: dict[str, tuple[Callable[[Path], SaeWeights], str]] = {
    "sae_lens": (read_sae_lens, "sae_weights.safetensors"),
    "gemma_scope": (read_gemma_scope, "params.npz"),
    "gemma_scope_2": (read_gemma_scope_2, "params.safetensors"),
    "sparsify": (read_sparsify, "sae.safetensors"),
    "llama_scope": (read_llama_scope, "hyperparams.json"),
    "goodfire": (read_goodfire, "*.pt*"),
}


def detect_format(path: Path) -> str:
    for name, (_, marker) in READERS.items():
        if (path.is_file() and path.match(marker)) or (path.is_dir() and any(path.glob(marker))):
            return name
    raise FsrlError(f"{path} is not an SAE fsrl reads: expected one of "
                    + ", ".join(f"{m} ({n})" for n, (_, m) in READERS.items()))


def read_weights(path: Path) -> SaeWeights:
    """The SAE at `path` in whatever public format it is."""
    return READERS[detect_format(path)][0](path).check(str(path))


# ------------------------------------------------------------------------ sae-lens's registry

# The registry's conversion_func -> the reader of what it points at (null: sae-lens's own).
REGISTRY_FORMATS = {None: "sae_lens", "gemma_2": "gemma_scope", "gemma_3": "gemma_scope_2",
                    "llama_scope": "llama_scope", "sparsify": "sparsify", "goodfire": "goodfire"}


def registry_entries() -> dict:
    """sae-lens's `pretrained_saes.yaml`, read from its package folder without importing
    sae_lens (seconds of imports at start)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise FsrlError("SAE names like RELEASE/SAE_ID need sae-lens installed (its registry)")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    # libyaml's loader, where PyYAML has it, reads the 40k-line file in 0.6 s instead of 2 s
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def resolve_release(name: str) -> tuple[Path, float | None]:
    """`RELEASE/SAE_ID` -> the SAE's local path (fetched into the hub cache by huggingface_hub,
    which honours HF_HUB_OFFLINE and works offline once cached) and the registry's
    norm_scaling_factor."""
    release, _, sae_id = name.partition("/")
    entries = registry_entries()
    if release not in entries:
        raise FsrlError(f"SAE {name!r}: no folder of that name and no release {release!r} in sae-lens's registry")
    entry = entries[release]
    found = [s for s in entry.get("saes", []) if s.get("id") == sae_id]
    if not found:
        raise FsrlError(f"SAE {name!r}: release {release!r} has no SAE {sae_id!r}")
    fmt = REGISTRY_FORMATS.get(entry.get("conversion_func"), "")
    if not fmt:
        raise FsrlError(f"SAE {name!r}: sae-lens converts it with {entry.get('conversion_func')!r}, "
                        "a format fsrl does not read")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    rel = found[0]["path"]
    try:
        root = Path(snapshot_download(entry["repo_id"], allow_patterns=[rel, f"{rel}/*", f"{rel}/*/*"]))
    except LocalEntryNotFoundError:
        raise FsrlError(f"SAE {name!r} ({entry['repo_id']}/{rel}) is not in the hub cache and the "
                        "hub cannot be reached (HF_HUB_OFFLINE, or no network)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise FsrlError(f"SAE {name!r}: cannot fetch {entry['repo_id']}: {str(exc).splitlines()[0]}") from None
    path = root / rel
    if not path.exists():
        raise FsrlError(f"SAE {name!r}: {entry['repo_id']} has no {rel}")
    if detect_format(path) != fmt:
        raise FsrlError(f"SAE {name!r}: {rel} is not a {fmt} folder")
    return path, found[0].get("norm_scaling_factor") if fmt == "sae_lens" else None
