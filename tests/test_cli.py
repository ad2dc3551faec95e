"""The command line fails with one clear line, never a traceback."""

import subprocess
import sys

import pytest

from fsrl.errors import FsrlError


def run_fsrl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsrl.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_unknown_flag_is_one_line():
    done = run_fsrl("bench", "--no-such-flag")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fsrl: error: unrecognized arguments: --no-such-flag (see fsrl --help)"]


def test_missing_input_is_one_line(tmp_path):
    done = run_fsrl("sae", "convert-gemma-scope", str(tmp_path / "nope"), str(tmp_path / "out"),
                    "--layer", "3")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no params.npz" in lines[0]


def test_help_lists_every_command():
    done = run_fsrl("--help")
    assert done.returncode == 0
    for command in ("serve", "train", "sae", "bench", "fetch-default"):
        assert command in done.stdout


def test_bench_measures_a_tiny_model_plain_and_packed(tmp_path):
    import json

    from fsrl.cli import main
    from fsrl.testing import write_tiny_setup

    setup = write_tiny_setup(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(setup.model_dir), "--sae", str(setup.sae_dir),
                 "--device", "cpu", "--batch-sizes", "1,2", "--new-tokens", "3",
                 "--prompt-tokens", "4", "--repeats", "1", "--adapter-l0", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["setup"].endswith("packed weights"), r["batch"]) for r in rows] == [
        (False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(r[f"{mode} tok/s"] > 0 for r in rows for mode in ("base", "adapter", "adapter+8"))


def test_bench_adapters_measures_each_count_of_distinct_adapters_beside_the_stock_batch(tmp_path):
    import json

    from fsrl.cli import main
    from fsrl.testing import write_tiny_setup

    setup = write_tiny_setup(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    assert main(["bench", "--adapters", "--model", str(setup.model_dir), "--sae", str(setup.sae_dir),
                 "--device", "cpu", "--batch-sizes", "4", "--new-tokens", "3", "--prompt-tokens", "4",
                 "--repeats", "1", "--adapter-l0", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["distinct"]) for r in rows] == [(4, 0), (4, 1), (4, 4)]  # 0: stock
    assert all(r["tok_s"] > 0 for r in rows) and rows[1]["ratio_to_one_adapter"] == 1.0


@pytest.mark.parametrize("flags", [["--compile-decode"], ["--static-cache-tokens", "256"]])
def test_the_removed_compiled_decode_flags_are_one_line(flags):
    done = run_fsrl("serve", *flags)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fsrl: error: --compile-decode and --static-cache-tokens were removed: the compiled fast "
        "path is --engine vllm (docs/vllm.md)"]


def test_the_renamed_device_budget_flag_says_its_new_name():
    done = run_fsrl("serve", "--max-adapters-on-device", "2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fsrl: error: --max-adapters-on-device was renamed --adapter-slots: adapters held on the device, "
        "the others paged in from host memory"]


def test_the_removed_compiled_decode_setting_is_one_line():
    import os

    done = subprocess.run([sys.executable, "-m", "fsrl.cli", "serve"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "FSRL_COMPILE_DECODE": "true"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fsrl: error: FSRL_COMPILE_DECODE was removed with --compile-decode: the compiled fast path "
        "is --engine vllm (docs/vllm.md)"]


def test_serving_beyond_loopback_without_an_api_key_is_refused_in_one_line(tmp_path):
    import os

    env_free = {"FSRL_API_KEY": ""}
    done = subprocess.run([sys.executable, "-m", "fsrl.cli", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env_free})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to serve on 0.0.0.0 without an API key" in lines[0]
    # --insecure-no-auth says so explicitly: the start goes on (to the next check, a missing SAE).
    done = subprocess.run([sys.executable, "-m", "fsrl.cli", "serve", "--host", "0.0.0.0",
                           "--insecure-no-auth", "--sae", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env_free})
    assert done.returncode == 2 and "no SAE at" in done.stderr and "refusing" not in done.stderr


def test_loopback_addresses_need_no_key():
    from server.cli import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "myhost.example"]))


@pytest.mark.parametrize("flags, message", [
    (["--tensor-parallel-size", "2"], "fsrl: error: --tensor-parallel-size and --enforce-eager are for --engine vllm"),
    (["--engine", "vllm", "--model", "model.gguf"],
     "fsrl: error: --engine vllm serves a transformers model folder or a packaged model "
     "(fsrl fetch-default --list), not 'model.gguf'"),
])
def test_engine_flags_that_do_not_go_together_are_one_line(flags, message):
    done = run_fsrl("serve", *flags)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [message]


def test_without_vllm_installed_the_vllm_engine_is_one_clear_error(monkeypatch):
    import importlib.util

    from server.cli import _preflight
    from server.settings import load_settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(FsrlError, match=r"--engine vllm needs vLLM installed: pip install 'fsrl\[vllm\]'"):
        _preflight(load_settings(engine="vllm"))


def test_the_vllm_engine_holds_few_adapters_on_the_device_unless_told_otherwise(monkeypatch):
    from server.settings import load_settings

    monkeypatch.delenv("FSRL_ADAPTER_SLOTS", raising=False)
    assert (load_settings().adapter_slots, load_settings().max_adapters) == (0, 64)
    # every bank slot is a buffer of the model; the other loaded adapters wait in host memory
    assert (load_settings(engine="vllm").adapter_slots, load_settings(engine="vllm").max_adapters) == (4, 64)
    assert load_settings(engine="vllm", adapter_slots=9).adapter_slots == 9
