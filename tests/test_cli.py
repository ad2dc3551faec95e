"""The command line fails with one clear line, never a traceback."""

import subprocess
import sys


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
