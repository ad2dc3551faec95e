"""The adapter registry on its own (no app, no HTTP), over an adapters directory of tiny
adapters: ids load, conflict, are replaced and unloaded under a per-id lock; a replace or an
unload swaps one reference, so whoever holds the old adapter object keeps it unchanged; a load
that fails leaves the registry as it was."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fsrl.adapter import save_adapter
from fsrl.errors import ConflictError, CorruptFileError, ForbiddenError, MismatchError, NotFoundError
from fsrl.testing import tiny_adapter, tiny_sae
from server.registry import AdapterRegistry

LAYER = 1
FINGERPRINT = "0"  # the base-model fingerprint of tiny adapters made without a base model


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(layer=LAYER)


@pytest.fixture(scope="module")
def root(sae, tmp_path_factory) -> Path:
    """`a` and `b` (good, other weights), `broken` (unreadable weights), `other-sae` (made for
    another SAE)."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in ((1, "a"), (2, "b")):
        save_adapter(tiny_adapter(sae, adapter_id=name, layer=LAYER, seed=seed), root / name)
    save_adapter(tiny_adapter(sae, adapter_id="broken", layer=LAYER), root / "broken")
    (root / "broken" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    save_adapter(tiny_adapter(tiny_sae(layer=LAYER, seed=7), adapter_id="other", layer=LAYER), root / "other-sae")
    return root


@pytest.fixture
def registry(root, sae) -> AdapterRegistry:
    return AdapterRegistry(root, sae, LAYER, FINGERPRINT, device=torch.device("cpu"), dtype=torch.float32)


def test_the_directory_loads_each_valid_folder_by_its_name(registry):
    registry.load_directory()
    assert [entry.id for entry in registry.entries()] == ["a", "b"]  # broken, other-sae skipped
    assert registry.get("a").id == "a" and registry.entry("b").path.name == "b"


def test_an_id_loaded_twice_conflicts_unless_replaced(registry):
    async def run():
        await registry.load("x", "a")
        with pytest.raises(ConflictError):
            await registry.load("x", "b")
        assert registry.entry("x").path.name == "a"
        await registry.load("x", "b", replace=True)
    asyncio.run(run())
    assert registry.entry("x").path.name == "b" and len(registry) == 1


def test_a_replace_swaps_one_reference_and_a_holder_keeps_the_old_adapter(registry):
    asyncio.run(registry.load("x", "a"))
    held = registry.get("x")  # as a running request holds it
    weights = held.W.clone()
    table = registry._adapters
    asyncio.run(registry.load("x", "b", replace=True))
    assert registry.get("x") is not held and not torch.equal(registry.get("x").W, weights)
    assert torch.equal(held.W, weights)  # the holder's adapter is untouched
    # The map was replaced, not edited: a reader that took the old one still sees the old adapter.
    assert registry._adapters is not table and table["x"].adapter is held


def test_an_unload_leaves_a_holder_its_adapter_and_the_id_is_unknown_after(registry):
    asyncio.run(registry.load("x", "a"))
    held = registry.get("x")
    table = registry._adapters
    asyncio.run(registry.unload("x"))
    assert "x" not in registry and table["x"].adapter is held
    for look_up in (registry.get, registry.entry, registry.card):
        with pytest.raises(NotFoundError):
            look_up("x")
    with pytest.raises(NotFoundError):
        asyncio.run(registry.unload("x"))


def test_concurrent_loads_of_one_id_take_turns(registry):
    async def run():
        return await asyncio.gather(registry.load("y", "a"), registry.load("y", "b"), return_exceptions=True)
    first, second = asyncio.run(run())
    # Without the lock both would find the id free while the other reads its files.
    assert first.path.name == "a" and isinstance(second, ConflictError)
    assert registry.entry("y") is first

    async def replace_both():
        return await asyncio.gather(registry.load("y", "b", replace=True), registry.load("y", "a", replace=True))
    asyncio.run(replace_both())
    assert registry.entry("y").path.name == "a"  # in the order they came
    assert registry._locks == {}  # no lock outlives its users


def test_the_adapter_limit_refuses_a_new_id_but_not_a_replace(root, sae):
    registry = AdapterRegistry(root, sae, LAYER, FINGERPRINT, device=torch.device("cpu"),
                               dtype=torch.float32, max_adapters=1)

    async def run():
        await registry.load("x", "a")
        with pytest.raises(ConflictError, match="limit of 1"):
            await registry.load("y", "b")
        await registry.load("x", "b", replace=True)
    asyncio.run(run())
    assert [entry.id for entry in registry.entries()] == ["x"]


@pytest.mark.parametrize("path, error", [("broken", CorruptFileError), ("other-sae", MismatchError),
                                         ("../elsewhere", ForbiddenError)],
                         ids=["corrupt", "other-sae", "outside"])
def test_a_failed_replace_leaves_the_old_adapter_in_place(registry, path, error):
    asyncio.run(registry.load("x", "a"))
    held = registry.get("x")
    with pytest.raises(error):
        asyncio.run(registry.load("x", path, replace=True))
    assert registry.get("x") is held and registry._locks == {}
