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
    layer = _layer_in(list(folder.resolve().parts), r"layer_(\d+)")
    if layer is None:
        raise FsrlError(f"{npz} does not name its layer: keep Gemma Scope's layer_L/width_.../ folders, "
                        "or convert it with `fsrl sae convert-gemma-scope DIR OUT --layer L`")
    return SaeWeights(W_enc, b_enc, W_dec, b_dec, "jumprelu", f"blocks.{layer}.hook_resid_post",
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
    enc_w, enc_b, W_dec, b_dec = _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    return SaeWeights(enc_w.T.contiguous(), enc_b, W_dec, b_dec, "topk", folder.name,
                      apply_b_dec_to_input=True, k=int(cfg["k"]), name=f"sparsify-{folder.name}")


def read_llama_scope(folder: Path) -> SaeWeights:
    """Llama Scope: `hyperparams.json` + `checkpoints/final.safetensors` (encoder.weight
    (d_sae, d), encoder.bias, decoder.weight (d, d_sae), decoder.bias), JumpReLU with a scalar
    threshold, inputs scaled by c_in = sqrt(d_model) / norm_in before encoding and outputs
    divided by c_out = sqrt(d_model) / norm_out after decoding ("dataset-wise" norms):

        pre = (c_in x) W_e^T + b_e;  f = pre * (pre > theta);  x_hat = (f W_d^T + b_d) / c_out

    Folded: W_enc = c_in W_e^T keeps pre (and so theta) as they are; W_dec = W_d^T / c_out and
    b_dec = b_d / c_out give x_hat. sae-lens's loader multiplies theta by c_in as well; the
    publisher's description above does not, and fsrl follows it (no real Llama Scope file can be
    reached here to settle it numerically)."""
    hp = _json(folder / "hyperparams.json")
    where = folder / "checkpoints" / "final.safetensors"
    tensors = _tensors(where)
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise FsrlError(f"{folder}: a transcoder (reads {hook_in}, writes {hook_out}) is not one "
                        "residual site fsrl can steer")
    if hp.get("act_fn", "jumprelu") != "jumprelu":
        raise FsrlError(f"{folder}/hyperparams.json: act_fn {hp.get('act_fn')!r} is not supported")
    enc_w, enc_b, dec_w, dec_b = _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight",
                                                 "decoder.bias"), where)
    d_model = int(hp.get("d_model", enc_w.shape[1]))
    c_in = c_out = 1.0
    if hp.get("norm_activation", "dataset-wise") == "dataset-wise":
        norms = hp.get("dataset_average_activation_norm") or {}
        if "in" not in norms:
            raise FsrlError(f"{folder}/hyperparams.json: dataset-wise norm without dataset_average_activation_norm")
        c_in = d_model ** 0.5 / float(norms["in"])
        c_out = d_model ** 0.5 / float(norms.get("out", norms["in"]))
    elif hp.get("norm_activation") not in (None, "none"):
        raise FsrlError(f"{folder}/hyperparams.json: norm_activation {hp.get('norm_activation')!r} is "
                        "per token, not a constant fsrl can fold into the weights")
    threshold = torch.full((enc_w.shape[0],), float(hp["jump_relu_threshold"]))
    return SaeWeights(enc_w.T * c_in, enc_b, dec_w.T / c_out, dec_b / c_out, "jumprelu", hook_in,
                      apply_b_dec_to_input=False, threshold=threshold, name=f"llama-scope-{folder.name}",
                      model_name=hp.get("model_name"))


def read_goodfire(path: Path) -> SaeWeights:
    """Goodfire: a `torch.save`d state dict (read with weights_only): encoder_linear (d_sae, d)
    and decoder_linear (d, d_sae) with biases; f = relu(x W_e^T + b_e), x_hat = f W_d^T + b_d.
    The file does not name its hook: its published name does (`...-SAE-l19.pth`: resid_post of 19)."""
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
    layer = _layer_in([files[0].stem], r".*-l(\d+)")
    if layer is None:
        raise FsrlError(f"{files[0]} does not name its layer (Goodfire's files end in -l<layer>)")
    return SaeWeights(enc_w.T.contiguous(), enc_b, dec_w.T.contiguous(), dec_b, "standard",
                      f"blocks.{layer}.hook_resid_post", apply_b_dec_to_input=False, name=files[0].stem)


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
    return yaml.safe_load(path.read_text())


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
