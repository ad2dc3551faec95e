"""Server settings: FSRL_* environment variables, overridden by `fsrl serve` flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fsrl.errors import FsrlError
from fsrl.sae import default_sae_dir


VLLM_DEFAULT_MAX_ADAPTERS = 4


class Settings(BaseSettings):
    # An empty FSRL_* variable means "not set" (compose passes ${FSRL_MODEL:-} through as "").
    model_config = SettingsConfigDict(env_prefix="FSRL_", extra="ignore", env_ignore_empty=True)

    model: str | None = None                 # None: the embedded default model
    sae: Path | None = None                  # None: the shipped default SAE
    layer: int | None = Field(None, ge=0)    # None: the layer of the SAE's hook name
    adapters_dir: Path = Path("adapters")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"
    max_new_tokens_cap: int = Field(1024, ge=1)
    max_queue: int = Field(64, ge=1)         # requests admitted at once; more get 503
    max_batch_rows: int = Field(16, ge=1)    # rows decoding together (a compare request is two)
    max_adapters_on_device: int = Field(0, ge=0)  # 0: no limit; else LRU between device and host
    max_request_bytes: int = Field(1 << 20, ge=1024)  # bigger bodies get 413
    max_prompt_tokens: int = Field(4096, ge=1)  # longer prompts get 422 (the model's length also caps)
    pack_cpu_weights: bool = True            # CPU float32: weights packed once for oneDNN
    max_adapters: int = Field(64, ge=1)      # adapters loaded at once; more loads get 409
    stream_send_timeout: float = Field(60.0, gt=0)  # seconds a streaming client may read nothing
    engine: Literal["transformers", "vllm"] = "transformers"  # vllm: needs fsrl[vllm]
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM engine: ranks the model is split over
    enforce_eager: bool = False              # vLLM engine: no compiled graph (starts faster)
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    insecure_no_auth: bool = False           # serve a non-loopback address without an API key

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # FSRL_API_KEY= (empty) must not lock every route

    @model_validator(mode="after")
    def _vllm_bank_default(self) -> "Settings":
        # Each slot of vLLM's adapter bank is a buffer of the compiled model (d_in x d_sae), and on
        # CUDA every slot still runs on every token: hold few unless told otherwise.
        if self.engine == "vllm" and "max_adapters" not in self.model_fields_set:
            self.max_adapters = VLLM_DEFAULT_MAX_ADAPTERS
        return self

    @property
    def sae_path(self) -> Path:
        return (self.sae or default_sae_dir()).expanduser()


# Settings that are gone, refused when set rather than ignored.
REMOVED_ENV = ("FSRL_COMPILE_DECODE", "FSRL_STATIC_CACHE_TOKENS")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with explicit (non-None) overrides; one-line errors."""
    removed = [name for name in REMOVED_ENV if os.environ.get(name, "").lower() not in ("", "0", "false")]
    if removed:  # set on purpose: say so rather than serve without it
        raise FsrlError(f"{' and '.join(removed)} {'were' if len(removed) > 1 else 'was'} removed with "
                        "--compile-decode: the compiled fast path is --engine vllm (docs/vllm.md)")
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise FsrlError(f"bad setting {field} (flag --{field.replace('_', '-')} or "
                        f"FSRL_{field.upper()}): {first['msg']}") from None
