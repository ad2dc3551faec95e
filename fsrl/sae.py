"""Frozen sparse autoencoders, read straight from sae-lens's disk format.

We read `cfg.json` + `sae_weights.safetensors` ourselves instead of importing sae_lens (which
pulls wandb, datasets and transformer-lens at import and costs seconds at server start). The
maths is the inference maths of sae-lens for the architectures we support:

    hidden_pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      # (..., d_sae)
    f          = activation(hidden_pre)                                 # relu | topk | jumprelu
    x_hat      = f @ W_dec + b_dec                                      # (..., d_in)

The other public formats are read into the same maths by `fsrl.sae_formats`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fsrl.cpu_inference import PackedMatrix
from fsrl.errors import CorruptFileError, FsrlError
from fsrl.sites import Site, parse_hook_name

SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
SAE_LABELS_FILE = "feature_labels.json"


def default_sae_dir() -> Path:
    """The SAE shipped for the embedded default model (built by `fsrl sae train`)."""
    return Path(__file__).parent / "default_sae"


def _relu_code(pre: torch.Tensor, sae: "Sae") -> torch.Tensor:
    return torch.relu(pre)


def _topk_code(pre: torch.Tensor, sae: "Sae") -> torch.Tensor:
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def _jumprelu(pre: torch.Tensor, sae: "Sae") -> torch.Tensor:
    return pre * (pre > sae.threshold)


# architecture string in cfg.json -> activation; resolved once at load.
SAE_ACTIVATIONS: dict[str, Callable[[torch.Tensor, "Sae"], torch.Tensor]] = {
    "standard": _relu_code,
    "relu": _relu_code,
    "topk": _topk_code,
    "jumprelu": _jumprelu,
}


@dataclass
class SaeInfo:
    name: str
    architecture: str
    hook_name: str | None  # as the SAE's publisher spells it
    layer: int | None
    model_name: str | None
    fingerprint: str
    labels: dict[int, str] = field(default_factory=dict)
    path: str | None = None
    label_sources: dict[int, str] = field(default_factory=dict)  # index -> "rule", "llm:<model>", ...
    site: Site | None = None  # read from hook_name; None only when the SAE names no hook

    @property
    def folder(self) -> Path | None:
        """Where labels and dashboards live: the SAE's folder (beside it, for a one-file SAE)."""
        if self.path is None:
            return None
        return Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent

    def __post_init__(self) -> None:
        # A hook fsrl cannot steer exactly is refused here, that is, at load.
        if self.site is None and self.hook_name:
            self.site = parse_hook_name(self.hook_name)
        if self.site is not None:
            self.layer = self.site.layer


class Sae(nn.Module):
    """A frozen SAE. Tensors are buffers, so `.to()` moves them and nothing trains them."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor, architecture: str, info: SaeInfo, k: int | None = None,
                 threshold: torch.Tensor | None = None, apply_b_dec_to_input: bool = True):
        super().__init__()
        if architecture not in SAE_ACTIVATIONS:
            raise FsrlError(f"unsupported SAE architecture {architecture!r}; "
                            f"supported: {', '.join(sorted(SAE_ACTIVATIONS))}")
        self.register_buffer("W_enc", W_enc)  # (d_in, d_sae)
        self.register_buffer("b_enc", b_enc)  # (d_sae,)
        self.register_buffer("W_dec", W_dec)  # (d_sae, d_in)
        self.register_buffer("b_dec", b_dec)  # (d_in,)
        self.register_buffer("threshold", threshold if threshold is not None
                             else torch.zeros_like(b_enc))
        self.architecture = architecture
        self._activation = SAE_ACTIVATIONS[architecture]
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.info = info
        self.packed_encoder: PackedMatrix | None = None  # set by pack_for_cpu (inference)
        self.packed_decoder: PackedMatrix | None = None

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pack_for_cpu(self) -> bool:
        """Pack W_enc and W_dec once for oneDNN (CPU float32 inference; see
        fsrl.cpu_inference). Returns whether it did. Calls that want gradients, or tensors
        elsewhere than the CPU, keep the plain products."""
        if not PackedMatrix.available_for(self.W_enc):
            return False
        self.packed_encoder = PackedMatrix(self.W_enc, self.b_enc)
        self.packed_decoder = PackedMatrix(self.W_dec)
        return True

    def pre_activations(self, x_in: torch.Tensor) -> torch.Tensor:
        """x_in @ W_enc + b_enc, for an input already shifted by b_dec where the SAE does so."""
        if self.packed_encoder is not None and self.packed_encoder.applies_to(x_in):
            return self.packed_encoder(x_in)
        return x_in @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> f: (..., d_sae)"""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return self._activation(self.pre_activations(x), self)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f: (..., d_sae) -> x_hat: (..., d_in)"""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def label(self, index: int) -> str | None:
        return self.info.labels.get(index)

    def site_at(self, layer: int | None = None) -> Site:
        """Where this SAE is steered: the site its hook names, moved to `layer` when one is
        given (a --layer override keeps the kind: resid_pre stays the input of a layer)."""
        if self.info.site is not None:
            return self.info.site if layer is None else self.info.site.at_layer(layer)
        if layer is None:
            raise FsrlError(f"SAE {self.info.name} names no hook; pass --layer (its residual "
                            "stream after that layer is then assumed)")
        return Site(layer, "resid_post")


def read_labels(folder: str | Path) -> dict[int, tuple[str, str]]:
    """`feature_labels.json` beside an SAE: index -> (label, source). The file holds
    {"<index>": {"label", "source"}}; a file of plain {"<index>": label} reads as source "file"."""
    path = Path(folder) / SAE_LABELS_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(k): (v, "file") if isinstance(v, str) else (str(v["label"]), str(v.get("source", "file")))
                for k, v in raw.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptFileError(f"{path.name}: not a labels file ({type(exc).__name__})") from None


def write_labels(folder: str | Path, labels: dict[int, tuple[str, str]]) -> Path:
    path = Path(folder) / SAE_LABELS_FILE
    path.write_text(json.dumps({str(i): {"label": label, "source": source}
                                for i, (label, source) in sorted(labels.items())}, indent=0) + "\n",
                    encoding="utf-8")
    return path


def sae_fingerprint(W_enc: torch.Tensor, W_dec: torch.Tensor, architecture: str) -> str:
    """Hash of shapes and a bfloat16-rounded sample of the weights (dtype and device proof)."""
    h = hashlib.sha256(f"{architecture}:{tuple(W_enc.shape)}:{tuple(W_dec.shape)}".encode())
    for w in (W_enc, W_dec):
        flat = w.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(256, flat.numel()), dtype=torch.float64).long()
        sample = flat[idx.to(flat.device)].to(torch.bfloat16).float().cpu().tolist()
        h.update(",".join(f"{v:.2g}" for v in sample).encode())
    return h.hexdigest()[:16]


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """'model.layers.12' or 'blocks.12.hook_resid_pre' -> 12 (`fsrl.sites.parse_hook_name`:
    a hook that is not a steerable site raises)."""
    return parse_hook_name(hook_name).layer if hook_name else None


def load_sae(path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> Sae:
    """Load an SAE in any format `fsrl.sae_formats` reads (a sae-lens folder, Gemma Scope 1 and
    2, sparsify, Llama Scope, Goodfire), or by sae-lens's registry name `RELEASE/SAE_ID`
    (fetched into the hub cache). Its hook must name a site fsrl steers (`fsrl.sites`)."""
    from fsrl.sae_formats import read_weights, resolve_release

    spec = str(path)
    path = Path(spec).expanduser()
    scaling = None
    if not path.exists():
        if spec.startswith(("/", ".", "~")) or "/" not in spec:
            raise FsrlError(f"SAE folder not found: {path}")
        path, scaling = resolve_release(spec)
    w = read_weights(path)
    W_enc, W_dec, b_dec = w.W_enc, w.W_dec, w.b_dec
    if scaling:  # the registry's norm_scaling_factor, folded as sae-lens's from_pretrained does
        W_enc, W_dec, b_dec = W_enc * scaling, W_dec / scaling, b_dec / scaling
    folder = path if path.is_dir() else path.parent
    found = read_labels(folder)
    info = SaeInfo(
        name=w.name or path.resolve().name, architecture=w.architecture, hook_name=w.hook_name,
        layer=None, model_name=w.model_name, fingerprint=sae_fingerprint(W_enc, W_dec, w.architecture),
        labels={i: label for i, (label, _) in found.items()},
        label_sources={i: source for i, (_, source) in found.items()}, path=str(path))
    sae = Sae(W_enc, w.b_enc, W_dec, b_dec, w.architecture, info, k=w.k, threshold=w.threshold,
              apply_b_dec_to_input=w.apply_b_dec_to_input)
    return sae.to(device=device, dtype=dtype or torch.float32)


def save_sae(sae: Sae, path: str | Path, dtype: torch.dtype = torch.float32,
             extra_metadata: dict | None = None) -> Path:
    """Write an SAE in sae-lens's inference disk format."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(sae, k).detach().to("cpu", dtype).contiguous()
               for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().to("cpu", dtype).contiguous()
    save_file(tensors, path / SAE_WEIGHTS_FILE)
    cfg = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": sae.info.hook_name, "model_name": sae.info.model_name,
                     "sae_name": sae.info.name, **(extra_metadata or {})},
    }
    if sae.k is not None:
        cfg["k"] = sae.k
    (path / SAE_CFG_FILE).write_text(json.dumps(cfg, indent=2))
    if sae.info.labels:
        write_labels(path, {i: (label, sae.info.label_sources.get(i, "file"))
                            for i, label in sae.info.labels.items()})
    return path


def convert_gemma_scope(npz_dir: str | Path, out_dir: str | Path, layer: int,
                        model_name: str = "google/gemma-2-2b-it") -> Path:
    """Turn a Gemma Scope `params.npz` folder (JumpReLU) into a sae-lens folder, offline."""
    import numpy as np

    npz_dir = Path(npz_dir)
    npz = npz_dir / "params.npz" if npz_dir.is_dir() else npz_dir
    if not npz.exists():
        raise FsrlError(f"no params.npz in {npz_dir}")
    params = np.load(npz)
    names = {k.lower(): k for k in params.files}
    try:
        t = {k: torch.from_numpy(params[names[k.lower()]]).float()
             for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    except KeyError as exc:
        raise CorruptFileError(f"{npz}: Gemma Scope array {exc} missing") from exc
    hook = f"model.layers.{layer}"
    info = SaeInfo(name=f"gemma-scope-{npz_dir.name}", architecture="jumprelu", hook_name=hook,
                   layer=layer, model_name=model_name,
                   fingerprint=sae_fingerprint(t["W_enc"], t["W_dec"], "jumprelu"))
    sae = Sae(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], "jumprelu", info,
              threshold=t["threshold"], apply_b_dec_to_input=False)
    return save_sae(sae, out_dir)


def random_sae(d_in: int, d_sae: int, architecture: str = "topk", k: int = 8, layer: int = 0,
               seed: int = 0, model_name: str | None = None) -> Sae:
    """A random SAE of the given shape (tests, benchmarks on random model shapes)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.T.clone() * 0.9
    b_enc = torch.randn(d_sae, generator=g) * 0.05 - 0.05
    b_dec = torch.randn(d_in, generator=g) * 0.02
    threshold = torch.full((d_sae,), 0.05)
    hook = f"model.layers.{layer}"
    info = SaeInfo(name=f"random-{architecture}-{d_sae}", architecture=architecture,
                   hook_name=hook, layer=layer, model_name=model_name,
                   fingerprint=sae_fingerprint(W_enc, W_dec, architecture))
    return Sae(W_enc, b_enc, W_dec, b_dec, architecture, info, k=k if architecture == "topk" else None,
               threshold=threshold if architecture == "jumprelu" else None)
