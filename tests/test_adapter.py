"""Adapter files: adapter.safetensors + adapter.json, validated on load."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fsrl.testing import tiny_adapter, tiny_sae
from fsrl.adapter import load_adapter, read_adapter_config, save_adapter
from fsrl.errors import CorruptFileError, ForbiddenError, FsrlError, MismatchError


@pytest.fixture()
def sae():
    return tiny_sae()


@pytest.fixture()
def saved(tmp_path, sae):
    adapter = tiny_adapter(sae, activation="soft_threshold", clamp_nonnegative=True)
    adapter.config.training = {"loss": "simpo", "steps": 3}
    return adapter, save_adapter(adapter, tmp_path / "a1")


def test_round_trip_keeps_tensors_and_metadata(saved, sae):
    adapter, folder = saved
    loaded = load_adapter(folder, sae=sae, layer=1, base_model_fingerprint="0")
    for name in ("W", "b", "b_in", "tau"):
        assert torch.equal(getattr(loaded, name), getattr(adapter, name))
    assert loaded.config == adapter.config
    x = torch.randn(3, sae.d_in)
    assert torch.equal(loaded(x), adapter(x))


def test_adapter_json_carries_the_contract_fields(saved):
    meta = json.loads((saved[1] / "adapter.json").read_text())
    for key in ("format", "format_version", "id", "activation", "clamp_nonnegative", "d_in",
                "d_sae", "layer", "base_model", "sae", "training"):
        assert key in meta
    assert meta["base_model"].keys() >= {"name", "fingerprint"}
    assert meta["sae"].keys() >= {"name", "fingerprint"}
    assert read_adapter_config(saved[1]).activation == "soft_threshold"


@pytest.mark.parametrize("kwargs,names", [
    ({"layer": 7}, "layer"),
    ({"base_model_fingerprint": "feedface"}, "base model"),
    ({"sae": "other"}, "SAE"),
])
def test_mismatch_names_what_does_not_match(saved, kwargs, names):
    if kwargs.get("sae") == "other":
        kwargs = {"sae": tiny_sae(seed=9)}
    with pytest.raises(MismatchError, match=names):
        load_adapter(saved[1], **kwargs)


def test_nan_weights_are_refused(saved):
    folder = saved[1]
    tensors = load_file(folder / "adapter.safetensors")
    tensors["W"][0, 0] = float("nan")
    save_file(tensors, folder / "adapter.safetensors")
    with pytest.raises(CorruptFileError, match="'W'.*NaN"):
        load_adapter(folder)


def test_wrong_shape_is_refused(saved):
    folder = saved[1]
    tensors = load_file(folder / "adapter.safetensors")
    tensors["b"] = tensors["b"][:-1].clone()
    save_file(tensors, folder / "adapter.safetensors")
    with pytest.raises(CorruptFileError, match="'b' has shape"):
        load_adapter(folder)


def test_truncated_weights_file_is_refused(saved):
    folder = saved[1]
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        load_adapter(folder)


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.pop("d_sae"), "missing field"),
    (lambda m: m.update(activation="tanh"), "unknown activation"),
    (lambda m: m.update(format="lora"), "format"),
    # strict: a string is not a number, "false" is not a boolean, nothing unknown, at most 1 MiB
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m.update(d_in=64.0), "d_in"),
    (lambda m: m.update(base_model="tiny-llama"), "base_model"),
    (lambda m: m.update(clamp_nonnegative="false"), "clamp_nonnegative"),
    (lambda m: m.update(layer=True), "layer"),
    (lambda m: m.update(extra_field=1), "extra_field"),
    (lambda m: m["sae"].update(fingerprint=7), "sae.fingerprint"),
    (lambda m: m.update(format_version=99), "newer than this fsrl reads"),
    (lambda m: m.update(training={"notes": "x" * (1 << 20)}), "larger than"),
], ids=["missing field", "unknown activation", "other format", "string version", "float d_in",
        "string base_model", "string bool", "bool layer", "unknown field", "int fingerprint",
        "future version", "over 1 MiB"])
def test_bad_metadata_is_refused(saved, edit, msg):
    path = saved[1] / "adapter.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match=msg):
        load_adapter(saved[1])


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FsrlError, match="adapter.json is missing"):
        load_adapter(tmp_path)


def test_adapter_json_nested_too_deep_is_refused(saved):
    (saved[1] / "adapter.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_adapter(saved[1])


def test_an_unexpected_tensor_is_refused_before_loading(saved):
    folder = saved[1]
    tensors = load_file(folder / "adapter.safetensors")
    tensors["payload"] = torch.zeros(4)
    save_file(tensors, folder / "adapter.safetensors")
    with pytest.raises(CorruptFileError, match="unexpected tensor.*payload"):
        load_adapter(folder)


def test_a_file_link_out_of_the_root_is_refused(saved, tmp_path):
    folder = saved[1]
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "adapter.safetensors").rename(outside)
    (folder / "adapter.safetensors").symlink_to(outside)
    load_adapter(folder)  # without a root, a link is just a file
    with pytest.raises(ForbiddenError, match="adapter.safetensors resolves outside"):
        load_adapter(folder, root=folder)


def test_messages_name_the_folder_as_the_caller_does(saved):
    (saved[1] / "adapter.safetensors").write_bytes(b"junk")
    with pytest.raises(CorruptFileError) as caught:
        load_adapter(saved[1], where="a1")
    assert str(caught.value).startswith("a1/adapter.safetensors") and str(saved[1]) not in str(caught.value)


def test_a_bank_row_steers_as_its_adapter_would_even_a_deep_copy_and_a_constant_push():
    """A bank row (`RowAdapters.by_slot`) gives a token exactly its adapter's v; a deep copy (what
    a device budget moves onto the device) keeps its activation; a constant adapter's row is b."""
    import copy

    from fsrl.adapter import RowAdapters, constant_adapter

    sae = tiny_sae()
    signed, plain = tiny_adapter(sae, activation="soft_threshold", seed=3), tiny_adapter(sae, seed=4)
    pushed = constant_adapter("push", sae, "tiny", "fp", 1, {3: 2.0, 9: -1.5}, {"kind": "features"})
    rows = RowAdapters(4, sae.d_in, sae.d_sae)
    rows.set_row(0, copy.deepcopy(signed))
    rows.set_row(1, plain)
    rows.set_row(3, pushed)
    x = torch.randn(4, sae.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = rows.by_slot(x, torch.arange(4))
        assert (signed(x[0]) < 0).any()  # soft_threshold pushes down too: a relu would not match
        torch.testing.assert_close(v[0], signed(x[0]))
        torch.testing.assert_close(v[1], plain(x[1]))
        assert torch.equal(v[3], pushed.b)
    assert v[2].abs().max() == 0  # a row without an adapter pushes nothing


# torch.compile takes seconds on a CPU: the compiled case runs in `make test`, not test-fast.
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_a_bank_runs_each_token_through_its_own_slot(compiled):
    """`RowAdapters.by_slot` (the vLLM engine's adapter bank): token n gets the v of the adapter
    in slot[n], 0 without a slot, compiled with static shapes as well as eager; a slot nobody
    uses is never read into another token (its inf weights reach no output)."""
    from fsrl.adapter import RowAdapters

    sae = tiny_sae()
    signed, plain = tiny_adapter(sae, activation="soft_threshold", seed=3), tiny_adapter(sae, seed=4)
    bank = RowAdapters(3, sae.d_in, sae.d_sae)
    bank.set_row(0, signed)
    bank.set_row(2, plain)
    bank.W[1].fill_(float("inf"))  # a slot in the bank that no token of this step uses
    x = torch.randn(6, sae.d_in, generator=torch.Generator().manual_seed(0))
    slot = torch.tensor([2, 0, -1, 0, 2, -1])
    by_slot = torch.compile(bank.by_slot, fullgraph=True) if compiled else bank.by_slot
    with torch.no_grad():
        v = by_slot(x, slot)
        for n, k in enumerate(slot.tolist()):
            expected = torch.zeros(sae.d_sae) if k < 0 else (signed, None, plain)[k](x[n])
            torch.testing.assert_close(v[n], expected)


def test_a_bank_on_a_cpu_multiplies_each_slot_in_use_once_on_its_own_tokens():
    """The CPU kernel of `slot_matmul` groups tokens by slot: one product per slot in use, over
    that slot's tokens alone, and none for an unused slot (the profiler records each product's
    shapes; running every slot on every token would show a K-slot product of all N tokens)."""
    from torch.profiler import ProfilerActivity, profile

    from fsrl.adapter import slot_matmul

    W = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    slot = torch.tensor([3, 0, -1, 3, 3, -1, 0])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = slot_matmul(x, W, slot)
    products = sorted(tuple(e.input_shapes[0]) for e in prof.events() if e.name in ("aten::mm", "aten::bmm"))
    assert products == [(2, 8), (3, 8)]  # slot 0's two tokens, slot 3's three; slots 1, 2 never run
    for n, k in enumerate(slot.tolist()):
        torch.testing.assert_close(out[n], torch.zeros(16) if k < 0 else x[n] @ W[k])


def test_a_pruned_adapter_is_the_dense_one_with_its_dropped_columns_zeroed_and_round_trips(tmp_path):
    """v of a pruned adapter equals the dense adapter's with the dropped features' columns of W,
    b and tau zeroed (up to float rounding; zero where dropped), on its own and as a bank row; saved as format 3 with `columns`
    and less memory, and loaded back the same."""
    from safetensors import safe_open

    from fsrl.adapter import RowAdapters, adapter_bytes, prune_adapter

    sae = tiny_sae()
    for activation in ("relu", "soft_threshold"):
        adapter = tiny_adapter(sae, activation=activation)
        keep = torch.tensor([3, 17, 40, 41, 200])
        pruned = prune_adapter(adapter, keep[torch.randperm(5)], {"min_share": 0})
        zeroed = copy.deepcopy(adapter)
        with torch.no_grad():
            dropped = torch.ones(sae.d_sae, dtype=torch.bool)
            dropped[keep] = False
            zeroed.W[:, dropped] = 0
            zeroed.b[dropped] = 0
            zeroed.tau[dropped] = 0
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) * 3
        # the same maths on a narrower product: equal up to float32 rounding, zeros exactly zero
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(pruned(x)[:, dropped], torch.zeros(6, int(dropped.sum())))
        assert pruned(x)[:, keep].abs().sum() > 0
        bank = RowAdapters(1, 64, sae.d_sae)
        bank.set_row(0, pruned)
        torch.testing.assert_close(bank.by_slot(x, torch.zeros(6, dtype=torch.long)), zeroed(x))
        folder = save_adapter(pruned, tmp_path / activation)
        with safe_open(folder / "adapter.safetensors", framework="pt") as fh:
            assert fh.get_tensor("columns").tolist() == keep.tolist() and fh.get_tensor("W").shape == (64, 5)
        meta = json.loads((folder / "adapter.json").read_text())
        assert (meta["columns"], meta["format_version"], meta["training"]["pruned"]) == (5, 3, {"min_share": 0})
        loaded = load_adapter(folder, sae=sae, layer=1)
        assert torch.equal(loaded(x), pruned(x))
        assert adapter_bytes(loaded) < adapter_bytes(adapter) / 10 and loaded.parameter_count() < 700


@pytest.mark.parametrize("edit, message", [
    (lambda meta, t: t.update(columns=torch.tensor([5, 3, 9, 11, 12])), "ascending"),
    (lambda meta, t: t.update(columns=torch.tensor([3, 17, 40, 41, 256])), "ascending feature indices in [0, 256)"),
    (lambda meta, t: meta.update(format_version=2), "columns needs format_version 3"),
    (lambda meta, t: meta.update(columns=300), "more than d_sae"),
], ids=["unordered", "out of range", "old version", "wider than the SAE"])
def test_a_pruned_adapter_file_that_does_not_add_up_is_refused(tmp_path, edit, message):
    from fsrl.adapter import prune_adapter

    sae = tiny_sae()
    folder = save_adapter(prune_adapter(tiny_adapter(sae), torch.tensor([3, 17, 40, 41, 200]), {}), tmp_path / "p")
    meta, tensors = json.loads((folder / "adapter.json").read_text()), load_file(folder / "adapter.safetensors")
    edit(meta, tensors)
    (folder / "adapter.json").write_text(json.dumps(meta))
    save_file(tensors, folder / "adapter.safetensors")
    with pytest.raises(CorruptFileError, match=re.escape(message)):
        load_adapter(folder, sae=sae, layer=1)
