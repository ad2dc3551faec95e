"""What the server holds while it runs: the model, the SAE, the adapters and the engine.

Built once in the app's lifespan (`start_state`: `load_state` for the default engine, the vLLM
engine's own start otherwise), handed to requests through `deps.StateDep`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from fsrl.analysis import hook_activations, reference_token_ids
from fsrl.cpu_inference import pack_linear_layers
from fsrl.errors import FsrlError, MismatchError
from fsrl.features import dashboards
from fsrl.features.classes import read_classes
from fsrl.features.search import FeatureIndex
from fsrl.generation import Generator
from fsrl.models import BaseModel, ensure_packaged_model, load_base_model, packaged_model, resolve_device
from fsrl.sae import Sae, load_sae
from fsrl.sites import Site
from server.engine import Engine, GenerationEngine
from server.metrics import EngineFigures, Metrics
from server.model_thread import ModelThread
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
    engine: GenerationEngine
    packed_cpu_weights: bool  # the model's, SAE's and adapters' weights packed for oneDNN
    # Prompt + generated tokens a request may have (None: unknown, not checked): what the
    # model attends over, and with vLLM what its cache holds.
    max_positions: int | None = None
    compiled_decode: bool = False  # decode steps run a compiled graph (the vLLM engine, not eager)
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)
    features: FeatureIndex | None = None  # labels and dashboards, for /features
    # Tokenising and adapter copies run here, one at a time, off the event loop.
    prepare_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsrl-prepare"))

    @property
    def site(self) -> Site:
        """Where the SAE is steered (its own site, moved to --layer where that was given)."""
        return self.sae.site_at(self.layer)

    @cached_property
    def token_strings(self) -> list[str]:
        """Each token id's text, decoded alone (OpenAI's `logprobs` show these)."""
        tok = self.base.tokenizer
        return tok.batch_decode([[i] for i in range(len(tok))])

    def token_text(self, token_id: int) -> str:
        strings = self.token_strings
        return strings[token_id] if 0 <= token_id < len(strings) else ""

    @property
    def vocab_size(self) -> int:
        return len(self.token_strings)

    @cached_property
    def max_chars_per_token(self) -> int:
        """The longest text one token stands for: a prompt longer than the prompt-token limit
        times this cannot fit, and is refused without tokenising it."""
        return max((len(s) for s in self.token_strings), default=1) or 1

    def close(self) -> None:
        self.engine.close()
        self.prepare_thread.shutdown(wait=False, cancel_futures=True)


def load_state(settings: Settings) -> ServerState:
    device = resolve_device(settings.device)
    # The model is loaded, measured and run on one thread (see server/model_thread.py).
    model_thread = ModelThread()
    try:
        generator, reference, packed = model_thread.call(_load_model, settings, device)
        base, sae, layer = generator.base, generator.sae, generator.layer
        registry = AdapterRegistry(settings.adapters_dir, sae, layer, base.fingerprint,
                                   device=device, dtype=base.dtype, paged=settings.adapter_slots > 0,
                                   reference=reference, pack_for_cpu=packed, max_adapters=settings.max_adapters,
                                   max_bytes=settings.adapter_memory_bytes)
        registry.load_directory()
    except BaseException:
        model_thread.close()
        raise
    metrics = Metrics()
    engine = Engine(generator, model_thread, max_pending=settings.max_queue,
                    max_batch_rows=settings.max_batch_rows, observe_batch=metrics.batch_size.observe,
                    adapter_slots=settings.adapter_slots)
    if engine.slots is not None:
        registry.bank = engine
        metrics.read_paging_from(engine.slots.pager)
    metrics.read_adapters_with(registry.memory)
    metrics.read_engine_with(lambda: EngineFigures(engine.pending, engine.running_rows, engine.step_failures,
                                                   engine.failed_jobs, engine.alive))
    state = ServerState(settings=settings, base=base, sae=sae, layer=layer, registry=registry,
                        engine=engine, packed_cpu_weights=packed, metrics=metrics,
                        features=load_feature_index(sae.info.folder, sae),
                        max_positions=_max_positions(base))
    state.max_chars_per_token  # measured once, at start, not on a request
    return state


async def start_state(settings: Settings) -> ServerState:
    """The state of either engine; the vLLM engine starts on the running event loop (its
    output handler lives there)."""
    if settings.engine != "vllm":
        return await asyncio.to_thread(load_state, settings)
    from fsrl.vllm_plugin import kv_cache_bytes
    from server.vllm_engine import BankKeys, VllmEngine, VllmOptions, start_async_llm

    # A host copy of the model (on the CPU) tokenises, names the fingerprint adapters are
    # checked against, and measures feature rankings; vLLM runs its own copy.
    model_thread = ModelThread()
    try:
        generator, reference, _ = await asyncio.to_thread(
            model_thread.call, _load_model, settings.model_copy(update={"pack_cpu_weights": False}),
            torch.device("cpu"))
    finally:
        model_thread.close()
    base, sae, layer = generator.base, generator.sae, generator.layer
    registry = AdapterRegistry(settings.adapters_dir, sae, layer, base.fingerprint, device=torch.device("cpu"),
                               dtype=base.dtype, reference=reference, max_adapters=settings.max_adapters,
                               max_bytes=settings.adapter_memory_bytes)
    await asyncio.to_thread(registry.load_directory)
    max_positions = _max_positions(base)
    max_len = settings.max_prompt_tokens + settings.max_new_tokens_cap
    options = VllmOptions(model=str(_model_folder(settings.model)), sae_dir=str(sae.info.path), layer=layer,
                          dtype=str(base.dtype).removeprefix("torch."),
                          max_model_len=min(max_len, max_positions or max_len),
                          max_num_seqs=max(settings.max_batch_rows, 2),
                          bank_slots=settings.adapter_slots,
                          kv_cache_bytes=kv_cache_bytes(base.model.config, base.dtype.itemsize,
                                                        max(settings.max_batch_rows, 2) * min(max_len, max_positions or max_len)),
                          tensor_parallel_size=settings.tensor_parallel_size,
                          enforce_eager=settings.enforce_eager)
    log.info("starting vLLM (%s)", options)
    llm = start_async_llm(options)
    try:
        bank = BankKeys(llm, options.bank_slots)
        for entry in registry.entries():
            await bank.add(entry.adapter, str(entry.path), entry.weights_sha256_16)
        registry.bank = bank
        metrics = Metrics()
        engine = VllmEngine(llm, base.tokenizer, generator.eos_ids, bank, max_pending=settings.max_queue)
    except BaseException:
        llm.shutdown()
        raise
    metrics.read_adapters_with(registry.memory)
    metrics.read_paging_from(bank.pager)
    metrics.read_engine_with(lambda: EngineFigures(engine.pending, engine.running_rows, engine.step_failures,
                                                   engine.failed_jobs, engine.alive))
    state = ServerState(settings=settings, base=base, sae=sae, layer=layer, registry=registry, engine=engine,
                        packed_cpu_weights=False, metrics=metrics,
                        features=load_feature_index(sae.info.folder, sae),
                        max_positions=options.max_model_len, compiled_decode=not settings.enforce_eager)
    state.max_chars_per_token
    return state


def load_feature_index(folder, sae: Sae) -> FeatureIndex:
    """The SAE's labels and, when they were built, its dashboards; dashboards that cannot be
    read are left out with one log line (the server still serves labels)."""
    try:
        doc = dashboards.read(folder, sae)
    except FsrlError as exc:
        log.warning("feature dashboards not loaded: %s", exc)
        doc = None
    try:
        stored = read_classes(folder)
    except FsrlError as exc:
        log.warning("feature classes file not loaded: %s", exc)
        stored = {}
    return FeatureIndex(sae.d_sae, sae.info.labels, sae.info.label_sources, doc, stored)


def _load_model(settings: Settings, device: torch.device) -> tuple[Generator, torch.Tensor, bool]:
    """The generator (the model, the SAE and the layer), the reference activations that feature
    rankings are measured on, and whether the weights were packed for the CPU (then the
    adapters must be too)."""
    log.info("loading model %s on %s", settings.model or "(embedded default)", device)
    base = load_base_model(settings.model, device)
    sae = load_sae(settings.sae_path, device=device, dtype=base.dtype)
    site = sae.site_at(settings.layer)  # the SAE's own site; --layer moves it to another layer
    if sae.d_in != base.d_model:
        raise MismatchError(f"SAE {sae.info.name} reads d_in={sae.d_in}, but model {base.name} "
                            f"has d_model={base.d_model}")
    if settings.layer is not None and sae.info.site != site:
        log.warning("SAE %s reads %s; serving it at %s (--layer)", sae.info.name,
                    sae.info.site or "no named hook", site)
    if sae.info.model_name and sae.info.model_name not in (base.name, settings.model):
        log.warning("SAE %s was made for %s, serving it on %s",
                    sae.info.name, sae.info.model_name, base.name)
    generator = Generator(base, sae, site.layer)  # checks the layer exists
    packed = settings.pack_cpu_weights and pack_linear_layers(base.model) > 0
    if packed:
        sae.pack_for_cpu()
        log.info("packed the model's linear layers and the SAE for oneDNN (CPU inference)")
    return generator, hook_activations(base, site, reference_token_ids(base.tokenizer)), packed


def _model_folder(spec: str | None) -> Path:
    """The transformers folder vLLM loads: a packaged model's (the embedded default's by
    default), or the one given."""
    packaged = packaged_model(spec)
    return ensure_packaged_model(packaged) if packaged is not None else Path(spec).expanduser()


def _max_positions(base: BaseModel) -> int | None:
    value = getattr(base.model.config, "max_position_embeddings", None)
    return int(value) if value else None
