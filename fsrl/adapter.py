"""The FSRL adapter: reads the residual stream, writes a steering vector in SAE feature space.

    x~ = x - b_in                          b_in: the SAE's b_dec, copied at creation   (d_in,)
    z  = x~ @ W + b                        W: (d_in, d_sae), b: (d_sae,)
    relu:            v = relu(z)                                     steering only adds
    soft_threshold:  v = sign(z) * relu(|z| - tau)                   tau: (d_sae,), learnable
    constant:        v = b                                           no learned map: W = 0, the
                     same push at every position (built from a contrast or a list of pushes,
                     `constant_adapter`); its file holds b alone

`clamp_nonnegative` (fused features clamped at zero, g = relu(f + s v)) is a flag the steering
module reads; the adapter itself only produces v. Files: `adapter.safetensors` holds the
tensors, `adapter.json` the metadata of API.md.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fsrl.cpu_inference import PackedMatrix
from fsrl.errors import CorruptFileError, ForbiddenError, FsrlError, MismatchError
from fsrl.sites import SITE_KINDS

if TYPE_CHECKING:
    from fsrl.sae import Sae

ADAPTER_FORMAT = "fsrl-adapter"
# 2: `site` (version 1 files were all made at resid_post); 3: `columns`, a pruned adapter's kept
# features (`prune_adapter`). Dense adapters are still written as version 2.
ADAPTER_FORMAT_VERSION = 3
DENSE_FORMAT_VERSION = 2
PRUNED_FORMAT_VERSION = 3
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
ALLOWED_SAFETENSORS_DTYPES = {"F32", "F16", "BF16"}
COLUMN_DTYPES = {"I64", "I32"}  # a pruned adapter's `columns`
META_MAX_BYTES = 1 << 20  # adapter.json; a training summary is a few kilobytes
MAX_D_IN, MAX_D_SAE = 1 << 16, 1 << 21


def _relu(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return torch.relu(z)


def _soft_threshold(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.relu(z.abs() - tau)


def _identity(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return z


@dataclass(frozen=True)
class Activation:
    """An adapter activation: v = fn(z, tau); whether tau is one of its learned weights;
    whether its map is learned (W) or the push is b alone."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    learns_threshold: bool
    learns_map: bool = True

    @property
    def signed(self) -> bool:
        """v may be negative: a bank row computes it as soft_threshold (with tau 0 for a
        constant push, where sign(b) * relu(|b|) = b exactly)."""
        return self.learns_threshold or not self.learns_map


# activation name -> what it is; the name is resolved here once (an adapter keeps its Activation).
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(_relu, learns_threshold=False),
    "soft_threshold": Activation(_soft_threshold, learns_threshold=True),
    "constant": Activation(_identity, learns_threshold=False, learns_map=False),
}


def learned_weights(activation: Activation) -> tuple[str, ...]:
    """The adapter weights training learns (and files store, with b_in beside them)."""
    if not activation.learns_map:
        return ("b",)
    return ("W", "b", "tau") if activation.learns_threshold else ("W", "b")


@dataclass
class AdapterConfig:
    """What `adapter.json` records. Round-trips through JSON."""

    id: str
    activation: str
    clamp_nonnegative: bool
    d_in: int
    d_sae: int
    layer: int
    base_model: dict[str, str]          # {"name", "fingerprint"}
    sae: dict[str, str]                 # {"name", "fingerprint"}
    training: dict[str, Any] = field(default_factory=dict)
    site: str = "resid_post"            # the kind of `fsrl.sites.Site` at `layer`
    columns: int | None = None          # pruned: how many features (columns of W) it keeps
    format: str = ADAPTER_FORMAT
    format_version: int = DENSE_FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.columns is None:  # a dense adapter's file is what version 2 reads
            del data["columns"]
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "adapter.json") -> "AdapterConfig":
        """Validated against the file format (`AdapterFile`): every field typed, nothing unknown."""
        if isinstance(data, dict) and isinstance(data.get("format_version"), int) \
                and not isinstance(data["format_version"], bool) and data["format_version"] > ADAPTER_FORMAT_VERSION:
            raise CorruptFileError(f"{where}: format_version {data['format_version']} is newer than "
                                   f"this fsrl reads ({ADAPTER_FORMAT_VERSION})")
        try:
            checked = AdapterFile.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field_name = ".".join(str(p) for p in first["loc"]) or "the file"
            if first["type"] == "missing":
                missing = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "missing"]
                raise CorruptFileError(f"{where}: missing field(s) {', '.join(missing)}") from None
            if first["loc"] == ("activation",):
                raise CorruptFileError(f"{where}: unknown activation {data.get('activation')!r}; "
                                       f"expected one of {', '.join(ACTIVATIONS)}") from None
            raise CorruptFileError(f"{where}: {field_name}: {first['msg']}") from None
        return cls(**checked.model_dump())


class _Named(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=512)
    fingerprint: str = Field(max_length=128)


class AdapterFile(BaseModel):
    """`adapter.json` as the format defines it. Strict: a string is not a number and "false" is
    not a boolean; unknown keys are refused (a typo would otherwise be silently ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["fsrl-adapter"]
    format_version: int = Field(ge=1, le=ADAPTER_FORMAT_VERSION)
    id: str = Field(min_length=1, max_length=128)
    activation: Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
    clamp_nonnegative: bool
    d_in: int = Field(ge=1, le=MAX_D_IN)
    d_sae: int = Field(ge=1, le=MAX_D_SAE)
    layer: int = Field(ge=0, le=10_000)
    site: Literal[SITE_KINDS] = "resid_post"  # type: ignore[valid-type]
    columns: int | None = Field(None, ge=1, le=MAX_D_SAE)
    base_model: _Named
    sae: _Named
    training: dict[str, Any] = {}

    @model_validator(mode="after")
    def _columns_fit(self) -> "AdapterFile":
        if self.columns is not None:
            if self.format_version < PRUNED_FORMAT_VERSION:
                raise ValueError(f"columns needs format_version {PRUNED_FORMAT_VERSION}")
            if self.columns > self.d_sae:
                raise ValueError(f"columns {self.columns} is more than d_sae {self.d_sae}")
            if not ACTIVATIONS[self.activation].learns_map:
                raise ValueError("a constant adapter has no columns to prune")
        return self


class SteeringAdapter(nn.Module):
    """What `fsrl.steering` takes as an adapter: a config, and v = self(x) of shape
    (..., d_in) -> (..., d_sae). Its id and clamp follow from the config."""

    config: AdapterConfig

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def clamp_nonnegative(self) -> bool:
        return self.config.clamp_nonnegative


class FsrlAdapter(SteeringAdapter):
    """v = activation(x~ @ W + b). Shapes: x (..., d_in) -> v (..., d_sae).

    Pruned (`config.columns` = C): W, b, tau hold only the C features in `columns` (ascending),
    and v is zero on every other feature: exactly the dense adapter with those columns of W,
    b and tau zeroed (`dense_weights`)."""

    def __init__(self, config: AdapterConfig, b_in: torch.Tensor | None = None,
                 init_std: float = 1e-4, seed: int = 0):
        super().__init__()
        self.config = config
        self.activation = ACTIVATIONS[config.activation]
        g = torch.Generator().manual_seed(seed)
        width = config.columns or config.d_sae
        # Near zero, so training starts at the base model; not exactly zero, or relu'(0) = 0
        # would leave W without a gradient.
        self.W = nn.Parameter(torch.randn(config.d_in, width, generator=g) * init_std)
        self.b = nn.Parameter(torch.zeros(width))
        self.tau = nn.Parameter(torch.full((width,), 1e-6 if self.activation.learns_threshold else 0.0),
                                requires_grad=self.activation.learns_threshold)
        # Pruned: the features its columns stand for (None: every feature, in order).
        self.register_buffer("columns", torch.arange(width) if config.columns is not None else None)
        self.register_buffer("b_in", b_in.detach().clone().float() if b_in is not None
                             else torch.zeros(config.d_in))
        self.packed: PackedMatrix | None = None  # set by pack_for_cpu (serving on a CPU)

    def pack_for_cpu(self) -> bool:
        """Pack W once for oneDNN, for CPU float32 inference (fsrl.cpu_inference); returns
        whether it did. The packed copy is of the weights now: for serving, not training."""
        if not PackedMatrix.available_for(self.W):
            return False
        self.packed = PackedMatrix(self.W, self.b)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.activation.learns_map:  # a constant push: b at every position
            return self.b.expand(*x.shape[:-1], self.b.shape[0])
        x_in = x.to(self.W.dtype) - self.b_in
        if self.packed is not None and self.packed.applies_to(x_in):
            z = self.packed(x_in)
        else:
            z = x_in @ self.W + self.b  # (..., d_sae), or (..., C) pruned
        v = self.activation.fn(z, self.tau)
        if self.columns is None:
            return v
        return v.new_zeros(*v.shape[:-1], self.config.d_sae).index_copy(-1, self.columns, v)

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, b, tau) at full width: a pruned adapter's dropped columns are zeros, where every
        activation gives v = 0."""
        if self.columns is None:
            return self.W, self.b, self.tau
        W = self.W.new_zeros(self.config.d_in, self.config.d_sae).index_copy(1, self.columns, self.W)
        b, tau = (t.new_zeros(self.config.d_sae).index_copy(0, self.columns, t) for t in (self.b, self.tau))
        return W, b, tau

    def parameter_count(self) -> int:
        """Learned parameters: W and b, plus tau where the activation learns it (frozen or not)."""
        return sum(getattr(self, name).numel() for name in learned_weights(self.activation))


class RowAdapters:
    """Adapters as row-stacked tensors, for a graph whose shapes never change (vLLM's adapter
    bank, `fsrl.vllm_plugin.site.AdapterBank`): row k computes v = activation_k((x - b_in_k)
    @ W_k + b_k), the same maths as its `FsrlAdapter`, for the tokens `by_slot` sends it. A row
    without an adapter holds zeros. Rows are written in place, so the tensors keep their
    addresses (CUDA graphs read them)."""

    def __init__(self, rows: int, d_in: int, d_sae: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.d_in, self.d_sae = d_in, d_sae
        self.W = torch.zeros(rows, d_in, d_sae, device=device, dtype=dtype)
        self.b = torch.zeros(rows, d_sae, device=device, dtype=dtype)
        self.b_in = torch.zeros(rows, d_in, device=device, dtype=dtype)
        self.tau = torch.zeros(rows, d_sae, device=device, dtype=dtype)
        self.soft_threshold = torch.zeros(rows, dtype=torch.bool, device=device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.W, self.b, self.b_in, self.tau, self.soft_threshold

    def set_row(self, row: int, adapter: FsrlAdapter | None) -> None:
        with torch.no_grad():
            if adapter is None:
                for t in self.tensors():
                    t[row].zero_()
                return
            if (adapter.config.d_in, adapter.config.d_sae) != (self.d_in, self.d_sae):
                raise MismatchError(f"adapter {adapter.id!r} has d_in={adapter.config.d_in} "
                                    f"d_sae={adapter.config.d_sae}, rows hold {self.d_in}x{self.d_sae}")
            W, b, tau = adapter.dense_weights()
            self.W[row].copy_(W)
            self.b[row].copy_(b)
            self.b_in[row].copy_(adapter.b_in)
            self.tau[row].copy_(tau)
            self.soft_threshold[row] = adapter.activation.signed

    def by_slot(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The rows as a bank of adapters: x (N, d_in) -> v (N, d_sae), token n through the
        adapter in row `slot[n]` (-1: v = 0). The product is `slot_matmul`'s: on a CPU each
        slot in use runs on its own tokens only, so the cost follows tokens, not slots."""
        k = slot.clamp(min=0)
        z = slot_matmul(x.to(self.W.dtype) - self.b_in[k], self.W, slot) + self.b[k]
        v = self._activate(z, self.tau[k], self.soft_threshold[k][:, None])
        return torch.where((slot >= 0)[:, None], v, 0.0)

    @staticmethod
    def _activate(z: torch.Tensor, tau: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return torch.where(soft, ACTIVATIONS["soft_threshold"].fn(z, tau), ACTIVATIONS["relu"].fn(z, tau))


@torch.library.custom_op("fsrl::slot_matmul", mutates_args=())
def slot_matmul(x: torch.Tensor, W: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """out[n] = x[n] @ W[slot[n]], 0 where slot[n] < 0. x (N, d_in), W (K, d_in, d_out),
    slot (N,) long.

    An opaque op to a compiler (its shapes are fixed: (N, d_out)), so a compiled graph keeps
    static shapes while the kernel underneath multiplies only the slots in use: on a CPU tokens
    are grouped by slot on the host (`host_grouped_slot_matmul`); on a GPU with a grouped GEMM
    for the dtype (`grouped_slot_matmul`) they are sorted by slot on the device, with no host
    read, so a CUDA graph can capture it. Elsewhere every slot runs on every token
    (`every_slot_matmul`), whose cost follows the bank's size rather than the slots in use."""
    if x.device.type == "cpu":
        return host_grouped_slot_matmul(x, W, slot)
    if grouped_mm_fits(x, W):
        return grouped_slot_matmul(x, W, slot)
    return every_slot_matmul(x, W, slot)


def host_grouped_slot_matmul(x: torch.Tensor, W: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`slot_matmul` with the grouping on the host: one product per slot in use, on its tokens."""
    out = x.new_zeros(x.shape[0], W.shape[-1])
    for k in slot[slot >= 0].unique().tolist():
        rows = (slot == k).nonzero().squeeze(-1)
        out.index_copy_(0, rows, x.index_select(0, rows) @ W[k])
    return out


def every_slot_matmul(x: torch.Tensor, W: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`slot_matmul` as every slot on every token, each token keeping its own slot's product."""
    every = torch.einsum("nd,kde->kne", x, W)                                        # (K, N, d_out)
    own = every.gather(0, slot.clamp(min=0)[None, :, None].expand(1, -1, W.shape[-1]))[0]
    return torch.where((slot >= 0)[:, None], own, 0.0)


def grouped_mm_fits(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs these operands on the device without reading the group
    sizes on the host: bfloat16 on CUDA chips of compute capability 8.0, 9.x or 10.x (elsewhere
    torch falls back to a per-group loop that reads the offsets on the host, which a CUDA graph
    cannot capture), rows 16-byte aligned."""
    if not (x.is_cuda and x.dtype == W.dtype == torch.bfloat16 and hasattr(torch.nn.functional, "grouped_mm")):
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    return ((major, minor) == (8, 0) or major in (9, 10)) and x.shape[-1] % 8 == 0 and W.shape[-1] % 8 == 0


def grouped_slot_matmul(x: torch.Tensor, W: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`slot_matmul` as one grouped GEMM: tokens sorted by slot on the device (unsteered ones
    last, past the final group, where the GEMM leaves them unwritten), group k's end at the
    number of tokens whose slot is at most k, products put back in token order. A slot no token
    uses is an empty group, so the cost follows the slots in use and the tokens."""
    K = W.shape[0]
    key = torch.where(slot >= 0, slot, K)
    order = torch.argsort(key, stable=True)
    ends = torch.searchsorted(key[order], torch.arange(1, K + 1, device=slot.device)).to(torch.int32)
    grouped = torch.nn.functional.grouped_mm(x.index_select(0, order), W, offs=ends)
    out = torch.empty_like(grouped).index_copy_(0, order, grouped)
    return torch.where((slot >= 0)[:, None], out, 0.0)


@slot_matmul.register_fake
def _slot_matmul_shape(x: torch.Tensor, W: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], W.shape[-1])


def new_adapter(adapter_id: str, sae: "Sae", base_model_name: str, base_model_fingerprint: str,
                layer: int, activation: str = "relu", clamp_nonnegative: bool = False,
                init_std: float = 1e-4, seed: int = 0) -> FsrlAdapter:
    """A fresh adapter bound to one base model, SAE and layer."""
    if activation not in ACTIVATIONS:
        raise FsrlError(f"unknown adapter activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    config = AdapterConfig(
        id=adapter_id, activation=activation, clamp_nonnegative=clamp_nonnegative,
        d_in=sae.d_in, d_sae=sae.d_sae, layer=layer, site=sae.site_at(layer).kind,
        base_model={"name": base_model_name, "fingerprint": base_model_fingerprint},
        sae={"name": sae.info.name, "fingerprint": sae.info.fingerprint})
    return FsrlAdapter(config, b_in=sae.b_dec, init_std=init_std, seed=seed)


def constant_adapter(adapter_id: str, sae: "Sae", base_model_name: str, base_model_fingerprint: str,
                     layer: int, pushes: dict[int, float], built_from: dict[str, Any]) -> FsrlAdapter:
    """An adapter with no learned map: v = b, b_j = pushes[j] (0 elsewhere), at every position.
    `built_from` (what it was made from: a contrast, a list) goes into `adapter.json`."""
    for j, value in pushes.items():
        if not 0 <= j < sae.d_sae:
            raise FsrlError(f"feature {j} is out of range [0, {sae.d_sae})")
        if not math.isfinite(value):
            raise FsrlError(f"the push on feature {j} is not finite")
    adapter = new_adapter(adapter_id, sae, base_model_name, base_model_fingerprint, layer,
                          activation="constant", init_std=0.0)
    adapter.config.training = {"built_from": built_from}
    with torch.no_grad():
        for j, value in pushes.items():
            adapter.b[j] = float(value)
    return adapter.requires_grad_(False).eval()


def adapter_bytes(adapter: nn.Module) -> int:
    """What an adapter's tensors hold in memory (W, b, b_in, tau, a pruned one's columns, in
    their dtypes)."""
    return sum(t.numel() * t.element_size() for t in (*adapter.parameters(), *adapter.buffers()))


def prune_adapter(adapter: FsrlAdapter, keep: torch.Tensor, record: dict[str, Any]) -> FsrlAdapter:
    """The adapter with only the features in `keep` (indices into the SAE's width): W, b and tau
    cut to those columns, v zero elsewhere. On every token where the dropped features' v was
    zero, it steers exactly as the adapter does. `record` (how the columns were chosen) goes
    into `adapter.json` under `training.pruned`."""
    if not adapter.activation.learns_map:
        raise FsrlError(f"adapter {adapter.id!r} is a constant push: it has no map to prune")
    keep = torch.unique(keep.long().cpu())  # ascending
    if keep.numel() == 0:
        raise FsrlError(f"adapter {adapter.id!r}: no feature would be kept")
    if not (0 <= int(keep[0]) and int(keep[-1]) < adapter.config.d_sae):
        raise FsrlError(f"features to keep must lie in [0, {adapter.config.d_sae})")
    config = copy.deepcopy(adapter.config)
    config.columns, config.format_version = keep.numel(), PRUNED_FORMAT_VERSION
    config.training = {**config.training, "pruned": record}
    pruned = FsrlAdapter(config, init_std=0.0)
    W, b, tau = (t.detach().cpu().float() for t in adapter.dense_weights())
    with torch.no_grad():
        pruned.W.copy_(W[:, keep])
        pruned.b.copy_(b[keep])
        pruned.tau.copy_(tau[keep])
        pruned.b_in.copy_(adapter.b_in.detach().cpu().float())
        pruned.columns.copy_(keep)
    return pruned.requires_grad_(False).eval().to(device=adapter.b.device, dtype=adapter.b.dtype)


def save_adapter(adapter: FsrlAdapter, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(adapter, name) for name in (*learned_weights(adapter.activation), "b_in")}
    if adapter.columns is not None:
        tensors["columns"] = adapter.columns
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, out_dir / WEIGHTS_FILE)
    (out_dir / META_FILE).write_text(json.dumps(adapter.config.to_json(), indent=2) + "\n")
    return out_dir


def _inside(path: Path, root: Path | None, where: str) -> Path:
    """`path` itself, once its real path (links followed) is known to lie under `root`."""
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise ForbiddenError(f"{where} resolves outside the adapters directory")
    return path


def read_adapter_config(folder: str | Path, where: str | None = None, root: Path | None = None
                        ) -> AdapterConfig:
    """`adapter.json`, read once (at most META_MAX_BYTES) and validated. `where` names the
    folder in messages (default: its path); `root`: the file must really lie under it."""
    folder = Path(folder)
    where = where if where is not None else str(folder)
    meta = _inside(folder / META_FILE, root, f"{where}/{META_FILE}")
    if not meta.is_file():
        raise CorruptFileError(f"{where}: {META_FILE} is missing")
    with open(meta, "rb") as fh:
        raw = fh.read(META_MAX_BYTES + 1)
    if len(raw) > META_MAX_BYTES:
        raise CorruptFileError(f"{where}/{META_FILE}: larger than {META_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, or nested too deep
        raise CorruptFileError(f"{where}/{META_FILE}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{where}/{META_FILE}: expected a JSON object")
    return AdapterConfig.from_json(data, where=f"{where}/{META_FILE}")


def _read_weights(path: Path, expected: dict[str, tuple[int, ...]], where: str) -> dict[str, torch.Tensor]:
    """The tensors, after the header alone has been checked: exactly the expected names, each
    shape, each dtype. Nothing is loaded from a file whose header does not match."""
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            names = set(fh.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                if missing:
                    raise CorruptFileError(f"{where}: tensor {missing[0]!r} is missing")
                raise CorruptFileError(f"{where}: unexpected tensor(s) {', '.join(map(repr, extra[:4]))}")
            for name, shape in expected.items():
                view = fh.get_slice(name)
                if tuple(view.get_shape()) != shape:
                    raise CorruptFileError(f"{where}: tensor {name!r} has shape "
                                           f"{tuple(view.get_shape())}, expected {shape}")
                if view.get_dtype() not in (COLUMN_DTYPES if name == "columns" else ALLOWED_SAFETENSORS_DTYPES):
                    raise CorruptFileError(f"{where}: tensor {name!r} has dtype {view.get_dtype()}")
            tensors = {name: fh.get_tensor(name) for name in expected}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{where}: cannot read ({type(exc).__name__}: {str(exc)[:200]})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptFileError(f"{where}: tensor {name!r} holds NaN or infinite values")
    return tensors


def load_adapter(folder: str | Path, *, sae: "Sae | None" = None, layer: int | None = None,
                 base_model_fingerprint: str | None = None, adapter_id: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 where: str | None = None, root: Path | None = None,
                 config: AdapterConfig | None = None) -> FsrlAdapter:
    """Load and validate an adapter folder.

    Checks the metadata, the tensors (exactly the expected names, shapes, dtypes, finite) and,
    where given, that the adapter was made for this base model, SAE and layer. Every failure
    names what does not match. `where` names the folder in messages (the server passes the
    path a client gave, never its own); with `root`, every file must really lie under it.
    `config`: the folder's `read_adapter_config`, when the caller has read it already.
    """
    folder = Path(folder)
    where = where if where is not None else str(folder)
    config = copy.copy(config) if config is not None else read_adapter_config(folder, where, root)
    if adapter_id is not None:
        config.id = adapter_id
    mismatches = []
    if base_model_fingerprint is not None and config.base_model.get("fingerprint") != base_model_fingerprint:
        mismatches.append(f"base model (adapter: {config.base_model.get('name')} "
                          f"{config.base_model.get('fingerprint')}, served: {base_model_fingerprint})")
    if sae is not None:
        if config.sae.get("fingerprint") != sae.info.fingerprint:
            mismatches.append(f"SAE (adapter: {config.sae.get('name')} {config.sae.get('fingerprint')}, "
                              f"served: {sae.info.name} {sae.info.fingerprint})")
        if (config.d_in, config.d_sae) != (sae.d_in, sae.d_sae):
            mismatches.append(f"shape (adapter d_in={config.d_in} d_sae={config.d_sae}, "
                              f"SAE d_in={sae.d_in} d_sae={sae.d_sae})")
    if layer is not None and config.layer != layer:
        mismatches.append(f"layer (adapter: {config.layer}, served: {layer})")
    if sae is not None and config.site != sae.site_at(config.layer).kind:
        mismatches.append(f"site (adapter: {config.site}, served: {sae.site_at(config.layer).kind})")
    if mismatches:
        raise MismatchError(f"adapter {config.id!r} was made for another setup: " + "; ".join(mismatches))

    weights_where = f"{where}/{WEIGHTS_FILE}"
    weights_path = _inside(folder / WEIGHTS_FILE, root, weights_where)
    if not weights_path.is_file():
        raise CorruptFileError(f"{where}: {WEIGHTS_FILE} is missing")
    width = config.columns or config.d_sae
    shapes = {"W": (config.d_in, width), "b": (width,), "tau": (width,)}
    expected = {name: shapes[name] for name in learned_weights(ACTIVATIONS[config.activation])}
    expected["b_in"] = (config.d_in,)
    if config.columns is not None:
        expected["columns"] = (width,)
    tensors = _read_weights(weights_path, expected, weights_where)
    adapter = FsrlAdapter(config, init_std=0.0)
    with torch.no_grad():
        if config.columns is not None:
            columns = tensors["columns"].long()
            if not (bool((columns[1:] > columns[:-1]).all()) and 0 <= int(columns[0]) and int(columns[-1]) < config.d_sae):
                raise CorruptFileError(f"{weights_where}: tensor 'columns' must be ascending feature "
                                       f"indices in [0, {config.d_sae})")
            adapter.columns.copy_(columns)
        if "W" in tensors:
            adapter.W.copy_(tensors["W"])
        adapter.b.copy_(tensors["b"])
        adapter.b_in.copy_(tensors["b_in"])
        if "tau" in tensors:
            adapter.tau.copy_(tensors["tau"])
    adapter.requires_grad_(False).eval()
    return adapter.to(device=device, dtype=dtype)
