"""What the server holds while it runs: the model, the SAE, the adapters and the engine.

Built once in the app's lifespan (`load_state`), handed to requests through `deps.StateDep`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fsrl.analysis import hook_activations, reference_token_ids
from fsrl.errors import FsrlError, MismatchError
from fsrl.generation import Generator
from fsrl.models import BaseModel, load_base_model, resolve_device
from fsrl.sae import Sae, load_sae
from server.engine import Engine
from server.metrics import Metrics
from server.registry import AdapterRegistry
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    base: BaseModel
    sae: Sae
    layer: int
    registry: AdapterRegistry
    engine: Engine
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)

    @property
    def max_positions(self) -> int | None:
        """Prompt + generated tokens the model can attend over (None: unknown, not checked)."""
        value = getattr(self.base.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    def close(self) -> None:
        self.engine.close()


def load_state(settings: Settings) -> ServerState:
    device = resolve_device(settings.device)
    log.info("loading model %s on %s", settings.model or "(embedded default)", device)
    base = load_base_model(settings.model, device)
    sae = load_sae(settings.sae_path, device=device, dtype=base.dtype)
    layer = settings.layer if settings.layer is not None else sae.info.layer
    if layer is None:
        raise FsrlError(f"SAE {sae.info.name} names no hook layer ({sae.info.hook_name!r}); "
                        "pass --layer")
    if sae.d_in != base.d_model:
        raise MismatchError(f"SAE {sae.info.name} reads d_in={sae.d_in}, but model {base.name} "
                            f"has d_model={base.d_model}")
    if settings.layer is not None and sae.info.layer not in (None, layer):
        log.warning("SAE %s was trained at layer %s, serving it at layer %d",
                    sae.info.name, sae.info.layer, layer)
    if sae.info.model_name and sae.info.model_name not in (base.name, settings.model):
        log.warning("SAE %s was made for %s, serving it on %s",
                    sae.info.name, sae.info.model_name, base.name)
    generator = Generator(base, sae, layer)  # checks the layer exists
    # Feature rankings are measured on these; captured now, before the engine owns the model.
    reference = hook_activations(base, layer, reference_token_ids(base.tokenizer))
    registry = AdapterRegistry(settings.adapters_dir, sae, layer, base.fingerprint,
                               device=device, dtype=base.dtype,
                               max_on_device=settings.max_adapters_on_device, reference=reference)
    registry.load_directory()
    metrics = Metrics()
    engine = Engine(generator, max_pending=settings.max_queue, max_batch_rows=settings.max_batch_rows,
                    observe_batch=metrics.batch_size.observe)
    return ServerState(settings=settings, base=base, sae=sae, layer=layer, registry=registry,
                       engine=engine, metrics=metrics)
