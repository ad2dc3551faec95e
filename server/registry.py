"""The adapter registry: which adapters the server steers with, by id.

Loads validate off to the side (in a worker thread, under a per-id lock), then swap one
reference: the id -> adapter map is replaced, never edited, so a reader sees either the old
map or the new one. A running request keeps the adapter object it started with, so a replace
or an unload never changes a generation already under way.

With device slots (`adapter_slots` > 0) adapters load into host memory and the engine pages
them onto the device as requests name them (server/paging.py); the registry tells the engine
(`bank`, an `AdapterCopies`) of each version it starts and stops serving. What the loaded adapters hold in host
memory is bounded by `max_bytes` as well as their number (`max_adapters`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fsrl.adapter import META_FILE, WEIGHTS_FILE, FsrlAdapter, adapter_bytes, load_adapter, read_adapter_config
from fsrl.analysis import FeaturePush, feature_push, top_features
from fsrl.audit_report import read_card
from fsrl.errors import ConflictError, CorruptFileError, ForbiddenError, FsrlError, NotFoundError
from fsrl.files import sha256_of
from fsrl.sae import Sae
from fsrl.sites import Site
from server.params import ADAPTER_ID

log = logging.getLogger(__name__)



def _shown(path: str | Path) -> str:
    """A client's path as messages show it: as given (never resolved), cut to 200 characters."""
    text = str(path)
    return text if len(text) <= 200 else text[:200] + "..."


class AdapterCopies(Protocol):
    """An engine's own copies of the adapter versions (the vLLM engine's bank, the default
    engine's device slots): told of a version before the registry serves it, and of a version
    the registry stopped serving."""

    async def add(self, adapter: FsrlAdapter, folder: str, weights_sha256_16: str | None) -> Any: ...

    async def retire(self, adapter: FsrlAdapter) -> None: ...

    def on_device(self, adapter: FsrlAdapter) -> bool: ...


@dataclass(frozen=True)
class LoadedAdapter:
    adapter: FsrlAdapter      # on the device, or in host memory when the engine pages adapters
    path: Path
    metadata: dict[str, Any]  # the adapter.json as found on disk
    loaded_at: float
    weights_sha256_16: str | None  # of the weights file as loaded: what an audit report is checked against

    @property
    def id(self) -> str:
        return self.adapter.id


class AdapterRegistry:
    def __init__(self, root: Path, sae: Sae, layer: int, base_fingerprint: str,
                 device: torch.device, dtype: torch.dtype, paged: bool = False,
                 reference: torch.Tensor | None = None, pack_for_cpu: bool = False,
                 max_adapters: int = 64, max_bytes: int | None = None):
        self.root = Path(root).expanduser().resolve()
        self.sae, self.layer, self.base_fingerprint = sae, layer, base_fingerprint
        self.device, self.dtype = device, dtype
        self.max_adapters = max_adapters  # loaded at once; a load beyond it is refused (409)
        self.max_bytes = max_bytes        # what their weights may hold; a load beyond it is refused (409)
        self.load_device = torch.device("cpu") if paged else device  # paged: the engine copies them in
        self.reference = reference  # hook-layer activations that feature rankings are measured on
        self.pack_for_cpu = pack_for_cpu  # adapters' W packed for oneDNN (the model's were: CPU only)
        self._adapters: dict[str, LoadedAdapter] = {}
        self._pushes: dict[str, tuple[LoadedAdapter, FeaturePush]] = {}
        # One lock per id while a load or unload of it runs; removed when no one holds it, so
        # the table never outgrows the ids being worked on.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # An engine that holds its own copy of each version (the vLLM engine's bank, the default
        # engine's device slots): told of a version before the registry serves it, and of a
        # version the registry stopped serving.
        self.bank: AdapterCopies | None = None

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def entries(self) -> list[LoadedAdapter]:
        return sorted(self._adapters.values(), key=lambda e: e.id)

    def entry(self, adapter_id: str) -> LoadedAdapter:
        found = self._adapters.get(adapter_id)
        if found is None:
            raise NotFoundError(f"unknown adapter {adapter_id!r}")
        return found

    def card(self, adapter_id: str) -> dict[str, Any]:
        """The audit summary `fsrl analyze` left beside the adapter, checked against the weights
        served under this id (hashed once, at load); 404 when there is none."""
        entry = self.entry(adapter_id)
        card = read_card(entry.path, self.root, entry.weights_sha256_16)
        if card is None:
            raise NotFoundError(f"adapter {adapter_id!r} has no analysis report "
                                "(write one with `fsrl analyze ADAPTER_FOLDER --data PREFS`)")
        site = Site(entry.metadata["layer"], entry.metadata["site"])
        return {"adapter": adapter_id, "site": site.hook_name, **card}

    def get(self, adapter_id: str) -> FsrlAdapter:
        """The adapter to steer with: the version served now (the engine pages it onto the
        device when it is kept in host memory)."""
        return self.entry(adapter_id).adapter

    def describe(self, entry: LoadedAdapter) -> dict[str, Any]:
        """`loaded`: on the device; `offloaded`: in host memory until a request asks for it."""
        on_device = self.bank is None or self.bank.on_device(entry.adapter)
        return {"id": entry.id, "status": "loaded" if on_device else "offloaded",
                "metadata": entry.metadata, "parameters": entry.adapter.parameter_count(),
                "bytes": adapter_bytes(entry.adapter), "dtype": str(entry.adapter.b.dtype).removeprefix("torch."),
                "device": str(self.device if on_device else self.load_device)}

    def memory(self) -> tuple[int, int]:
        """(adapters loaded, bytes their weights hold where they are kept)."""
        entries = self.entries()
        return len(entries), sum(adapter_bytes(e.adapter) for e in entries)

    def resolve(self, path: str | Path) -> Path:
        """A folder under the adapters directory (symlinks and .. resolved), else 403."""
        try:
            folder = (self.root / Path(path).expanduser()).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops, bad ~user
            raise ForbiddenError(f"path {_shown(path)!r} cannot be resolved ({type(exc).__name__})") from exc
        if not folder.is_relative_to(self.root):
            raise ForbiddenError(f"path {_shown(path)!r} resolves outside the adapters directory")
        return folder

    def _load(self, adapter_id: str, folder: Path, where: str) -> LoadedAdapter:
        """Read and check one folder; every file must really lie under the adapters directory.
        Any failure is a CorruptFileError (400) naming the folder as the client named it."""
        try:
            config = read_adapter_config(folder, where, self.root)
            metadata = config.to_json()  # as on disk, before the id is the registry's
            adapter = load_adapter(folder, sae=self.sae, layer=self.layer,
                                   base_model_fingerprint=self.base_fingerprint,
                                   adapter_id=adapter_id, device=self.load_device, dtype=self.dtype,
                                   where=where, root=self.root, config=config)
            if self.pack_for_cpu:
                adapter.pack_for_cpu()
            digest = sha256_of(folder / WEIGHTS_FILE, 16)
        except FsrlError:
            raise
        except OSError as exc:  # a name too long, a permission, a folder gone mid-load
            raise CorruptFileError(f"cannot read the adapter in {where}: {exc.strerror or type(exc).__name__}") from exc
        except Exception as exc:  # anything else the files provoke is still the files' fault
            log.exception("adapter %s from %s", adapter_id, where)
            raise CorruptFileError(f"cannot load the adapter in {where} ({type(exc).__name__})") from exc
        return LoadedAdapter(adapter, folder, metadata, time.time(), digest)

    def load_directory(self) -> None:
        """At start: every folder of the adapters directory holding an adapter.json, by
        folder name, up to `max_adapters`. A broken one is skipped with one log line."""
        if not self.root.is_dir():
            log.warning("adapters directory %s does not exist; starting with no adapters", self.root)
            return
        loaded: dict[str, LoadedAdapter] = {}
        for folder in sorted(self.root.iterdir()):
            if not (folder / META_FILE).is_file():
                continue
            if len(loaded) >= self.max_adapters:
                log.warning("skipping adapter %s: the registry holds at most %d adapters "
                            "(--max-adapters)", folder.name, self.max_adapters)
                continue
            try:
                if not ADAPTER_ID.match(folder.name):
                    raise FsrlError(f"{folder.name!r} is not a valid adapter id")
                entry = self._load(folder.name, self.resolve(folder.name), folder.name)
                self._check_memory(entry, loaded.values())
            except FsrlError as exc:
                log.warning("skipping adapter %s: %s", folder.name, exc)
                continue
            loaded[entry.id] = entry
            log.info("adapter %s loaded (%d parameters)", entry.id, entry.adapter.parameter_count())
        self._adapters = loaded

    def _check_memory(self, entry: LoadedAdapter, others) -> None:
        """409 when `entry` beside `others` would hold more than `max_bytes`."""
        if self.max_bytes is None:
            return
        size = adapter_bytes(entry.adapter)
        total = size + sum(adapter_bytes(e.adapter) for e in others)
        if total > self.max_bytes:
            raise ConflictError(f"adapter {entry.id!r} ({size / 2**20:.1f} MiB) would put the adapters' memory at "
                                f"{total / 2**30:.2f} GiB, over this server's {self.max_bytes / 2**30:.2f} GiB "
                                "(--adapter-memory-gib); unload one first")

    @asynccontextmanager
    async def _locked(self, adapter_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(adapter_id, (asyncio.Lock(), 0))
        self._locks[adapter_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[adapter_id]
            if users == 1:
                del self._locks[adapter_id]
            else:
                self._locks[adapter_id] = (lock, users - 1)

    async def load(self, adapter_id: str, path: str, replace: bool = False) -> LoadedAdapter:
        folder = self.resolve(path)
        async with self._locked(adapter_id):
            existed = adapter_id in self._adapters
            if existed and not replace:
                raise ConflictError(f"adapter {adapter_id!r} is already loaded; "
                                    "send replace: true to swap it")
            if not existed and len(self._adapters) >= self.max_adapters:
                raise ConflictError(f"the server holds its limit of {self.max_adapters} adapters; "
                                    "unload one first")
            entry = await asyncio.to_thread(self._load, adapter_id, folder, _shown(path))
            self._check_memory(entry, [e for e in self._adapters.values() if e.id != adapter_id])
            if self.bank is not None:
                await self.bank.add(entry.adapter, str(entry.path), entry.weights_sha256_16)
            old = self._adapters.get(adapter_id)
            self._adapters = {**self._adapters, adapter_id: entry}
            if self.bank is not None and old is not None:
                await self.bank.retire(old.adapter)
            self._pushes.pop(adapter_id, None)  # else it pins the replaced weights until asked
        log.info("adapter %s %s from %s", adapter_id, "replaced" if existed else "loaded", folder)
        return entry

    async def unload(self, adapter_id: str) -> None:
        self.entry(adapter_id)  # 404 for an unknown id before anything is kept for it
        async with self._locked(adapter_id):
            old = self.entry(adapter_id)
            self._adapters = {k: v for k, v in self._adapters.items() if k != adapter_id}
            if self.bank is not None:
                await self.bank.retire(old.adapter)
            self._pushes.pop(adapter_id, None)
        log.info("adapter %s unloaded", adapter_id)

    def top_features(self, adapter_id: str, top: int) -> list[dict[str, Any]]:
        """The features the adapter pushes hardest: mean |v| (with mean v and the share of
        tokens it is non-zero on) over the reference activations, measured once per loaded
        version."""
        entry = self.entry(adapter_id)
        cached = self._pushes.get(adapter_id)
        if cached is None or cached[0] is not entry:
            if self.reference is None or self.reference.shape[0] == 0:
                raise FsrlError("this server has no reference activations to measure features on")
            cached = self._pushes[adapter_id] = (entry, feature_push(entry.adapter, self.reference))
        return top_features(cached[1], self.sae, top)
