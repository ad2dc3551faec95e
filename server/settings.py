"""Server settings: FSRL_* environment variables, overridden by `fsrl serve` flags, both made
from the `Settings` fields (no torch here: `fsrl serve --help` reads it).

    python -m server.settings        prints docs/api.md's `fsrl serve` flag table"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fsrl.errors import FsrlError


VLLM_DEFAULT_ADAPTER_SLOTS = 4


def _flag(default: Any, help: str, shown: str | None = None, cli: bool = True, **bounds: Any) -> Any:
    """A setting: `help` is its flag's help and its line in docs/api.md's flag table; `shown`
    its default as people read it (else the value); `cli=False`: environment only (secrets)."""
    return Field(default, description=help, json_schema_extra={"shown": shown, "cli": cli}, **bounds)


class Settings(BaseSettings):
    """Every `fsrl serve` setting, once: each is a flag (`--max-queue`) and an environment
    variable (`FSRL_MAX_QUEUE`); the flags, their help and docs/api.md's flag table are made from
    these fields (`flag_specs`, `flag_table`)."""

    # An empty FSRL_* variable means "not set" (compose passes ${FSRL_MODEL:-} through as "").
    model_config = SettingsConfigDict(env_prefix="FSRL_", extra="ignore", env_ignore_empty=True)

    model: str | None = _flag(None, "a transformers folder, a `.gguf` file, a packaged model (`fsrl fetch-default "
                              "--list`) or a hub name", "the embedded SmolLM2-135M-Instruct")
    sae: Path | None = _flag(None, "the SAE: a folder in any format docs/models.md lists, or a sae-lens registry "
                             "name RELEASE/SAE_ID", "the shipped SAE (`fsrl/default_sae`)")
    layer: int | None = _flag(None, "the hook layer (its site's kind is the SAE's)", "the layer in the SAE's hook name",
                              ge=0)
    adapters_dir: Path = _flag(Path("adapters"), "the folder of adapter folders",
                               "`adapters` (relative to the working directory)")
    host: str = _flag("127.0.0.1", "the bind address")
    port: int = _flag(8000, "the port; `0` picks a free one (it is logged)", ge=0, le=65535)
    device: str = _flag("auto", "`auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks CUDA when available (bfloat16 "
                        "where the card supports it)")
    max_new_tokens_cap: int = _flag(1024, "the largest `max_new_tokens` / `max_tokens` a request may ask for", ge=1)
    max_prompt_tokens: int = _flag(4096, "the longest prompt accepted, in tokens", ge=1)
    max_request_bytes: int = _flag(1 << 20, "the largest request body accepted (at least 1024)", ge=1024)
    max_queue: int = _flag(64, "requests admitted at once before answering 503", ge=1)
    max_batch_rows: int = _flag(16, "rows decoding together, and the most one request may ask for (a compare "
                                "request is two)", ge=1)
    max_adapters: int = _flag(64, "adapters loaded at once (in host memory when they outnumber the slots); a load "
                              "beyond it gets 409", ge=1)
    adapter_slots: int = _flag(0, "adapters held on the device at once; the others wait in host memory and are paged "
                               "in between steps when a request names one (least recently used out, never one a "
                               "running request uses; a request waits for a slot, it does not fail). With "
                               "`--engine vllm` each slot is a buffer of the compiled model",
                               f"`0` (every loaded adapter on the device); `{VLLM_DEFAULT_ADAPTER_SLOTS}` with "
                               "`--engine vllm`", ge=0)
    adapter_memory_gib: float | None = _flag(None, "host memory the loaded adapters' weights may take, in GiB; a "
                                             "load beyond it gets 409", "a quarter of this machine's memory", gt=0)
    pack_cpu_weights: bool = _flag(True, "on a CPU, pack the model's, SAE's and adapters' weights once for oneDNN, "
                                   "so a batch of several rows costs about one row", "on")
    engine: Literal["transformers", "vllm"] = _flag(
        "transformers", "what runs the model: `transformers` (fsrl's own continuous batching) or `vllm` (vLLM's "
        "engine with the steering compiled into its model; needs `pip install 'fsrl[vllm]'` and a transformers "
        "model folder or a packaged model; docs/vllm.md). Seeded sampling is reproducible on each engine but "
        "does not draw the same tokens on both")
    tensor_parallel_size: int = _flag(1, "with `--engine vllm`: the ranks (GPUs) the model is split over; steering "
                                      "runs on every rank", ge=1)
    enforce_eager: bool = _flag(False, "with `--engine vllm`: no compiled graph (starts faster, decodes slower)",
                                "off")
    stream_send_timeout: float = _flag(60.0, "seconds a streaming client may read nothing before it is cut off",
                                       "`60`", gt=0)
    insecure_no_auth: bool = _flag(False, "serve a non-loopback `--host` without `FSRL_API_KEY` (refused "
                                   "otherwise): anyone who reaches the port can generate and swap adapters", "off")
    api_key: SecretStr | None = _flag(None, "see Authentication", "unset", cli=False)
    admin_key: SecretStr | None = _flag(None, "see Authentication", "unset", cli=False)

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # FSRL_API_KEY= (empty) must not lock every route

    @model_validator(mode="after")
    def _vllm_bank_default(self) -> "Settings":
        # Each slot of vLLM's adapter bank is a buffer of the compiled model (d_in x d_sae): hold
        # few unless told otherwise; the other loaded adapters wait in host memory.
        if self.engine == "vllm" and not self.adapter_slots:
            self.adapter_slots = VLLM_DEFAULT_ADAPTER_SLOTS
        return self

    @property
    def adapter_memory_bytes(self) -> int:
        if self.adapter_memory_gib is not None:
            return int(self.adapter_memory_gib * 2**30)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4

    @property
    def sae_path(self) -> Path:
        from fsrl.sae import default_sae_dir  # torch: only when the path is asked for

        return (self.sae or default_sae_dir()).expanduser()


# Settings that are gone, refused when set rather than ignored.
_COMPILE_DECODE_GONE = "removed with --compile-decode: the compiled fast path is --engine vllm (docs/vllm.md)"
REMOVED_ENV = {"FSRL_COMPILE_DECODE": _COMPILE_DECODE_GONE, "FSRL_STATIC_CACHE_TOKENS": _COMPILE_DECODE_GONE,
               "FSRL_MAX_ADAPTERS_ON_DEVICE": "renamed FSRL_ADAPTER_SLOTS (--adapter-slots): adapters held on "
                                              "the device, the others paged in from host memory"}


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with explicit (non-None) overrides; one-line errors."""
    removed = [name for name in REMOVED_ENV if os.environ.get(name, "").lower() not in ("", "0", "false")]
    if removed:  # set on purpose: say so rather than serve without it
        raise FsrlError("; ".join(f"{name} was {REMOVED_ENV[name]}" for name in removed))
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise FsrlError(f"bad setting {field} (flag --{field.replace('_', '-')} or "
                        f"FSRL_{field.upper()}): {first['msg']}") from None


@dataclass(frozen=True)
class FlagSpec:
    name: str             # the field
    flag: str             # --max-queue
    env: str              # FSRL_MAX_QUEUE
    help: str
    shown: str            # the default as docs show it
    kwargs: dict          # for argparse's add_argument


def _shown(value: Any) -> str:
    return f"`{value}`"


def flag_specs() -> list[FlagSpec]:
    """One flag per `Settings` field (but the secrets). Every flag's argparse default is None, so
    a flag left out leaves the FSRL_* variable (or the field's default) in force."""
    specs = []
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        flag, env = "--" + name.replace("_", "-"), "FSRL_" + name.upper()
        shown = extra.get("shown") or _shown(field.default)
        kind = field.annotation
        if kind is bool:
            kwargs: dict[str, Any] = ({"action": argparse.BooleanOptionalAction} if field.default
                                      else {"action": "store_true", "default": None})
        elif get_origin(kind) is Literal:
            kwargs = {"choices": list(get_args(kind))}
        else:
            base = next((t for t in get_args(kind) if t is not type(None)), kind) if get_args(kind) else kind
            kwargs = {"type": {int: int, float: float}.get(base, str),
                      "metavar": {int: "N", float: "S"}.get(base, name.upper().split("_")[-1])}
        if extra.get("cli", True):
            kwargs["help"] = f"{field.description} (default: {shown.replace('`', '')})".replace("%", "%%")
        specs.append(FlagSpec(name, flag, env, field.description or "", shown, kwargs))
    return specs


def flag_table() -> str:
    """docs/api.md's `fsrl serve` flag table (tests/test_cli_defaults.py checks it is this)."""
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for spec in flag_specs():
        cli = (Settings.model_fields[spec.name].json_schema_extra or {}).get("cli", True)
        flag = spec.flag if not cli or spec.kwargs.get("action") != argparse.BooleanOptionalAction \
            else f"{spec.flag}` / `--no-{spec.flag[2:]}"
        meaning = spec.help if cli else "see [Authentication](#authentication)"
        rows.append(f"| {'`' + flag + '`' if cli else '–'} | `{spec.env}` | {spec.shown} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flag_table())
