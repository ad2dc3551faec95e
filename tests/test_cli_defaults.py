"""The command lines of `fsrl train` and `fsrl sae train` take their defaults from the config
dataclasses (TrainConfig, SaeTrainConfig): a flag's default is its field's default, the config
built from the flags is the dataclass's own, and `--help` still shows the defaults it showed."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from fsrl import cli
from fsrl.cli_options import ConfigOptions, field_defaults
from fsrl.sae_training.config import SaeTrainConfig, rebuild_command
from fsrl.train.config import TrainConfig

# (argv with only the required flags, the config class, those flags' fields)
COMMANDS = {
    "train": (["train", "--data", "prefs.jsonl", "--out", "adapters/a"], TrainConfig,
              {"data": "prefs.jsonl", "out": "adapters/a"}),
    "sae train": (["sae", "train", "--text", "corpus.txt", "--layer", "3", "--out", "sae"],
                  SaeTrainConfig, {"text": "corpus.txt", "layer": 3, "out": "sae"}),
}


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser(argv).parse_args(argv)


def build_config(args: argparse.Namespace):
    if args._module == "fsrl.train.cli":
        from fsrl.train.cli import config_from_args
        return config_from_args(args)
    from fsrl.sae_training.cli import OPTIONS
    return OPTIONS.config(args)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_flag_default_is_its_config_field_default(command):
    argv, config_cls, _ = COMMANDS[command]
    given = vars(parse(argv))
    defaults = field_defaults(config_cls)
    compared = {name: given[name] for name in defaults if name in given}
    assert len(compared) >= 20  # nearly every field is a flag
    disagree = {name: (value, defaults[name]) for name, value in compared.items()
                if value != defaults[name] or type(value) is not type(defaults[name])}
    assert disagree == {}, f"flag default != {config_cls.__name__} default: {disagree}"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_config_built_from_the_required_flags_is_the_dataclass_default(command):
    argv, config_cls, required = COMMANDS[command]
    assert build_config(parse(argv)) == config_cls(**required)
    no_default = {f.name for f in dataclasses.fields(config_cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert no_default == set(required)  # and these are the flags the command requires
    with pytest.raises(SystemExit):
        parse(argv[: -2])


def test_an_option_cannot_restate_a_config_default():
    options = ConfigOptions(TrainConfig)
    with pytest.raises(TypeError, match="TrainConfig.lr"):
        options.add(argparse.ArgumentParser(), "--lr", type=float, default=1e-3)
    # a flag that fills no field is left alone
    action = options.add(argparse.ArgumentParser(), "--threads", type=int, default=2)
    assert action.default == 2


def test_train_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = field_defaults(TrainConfig)
    shown = {"--max-length": d["max_length"], "--device": d["device"],
             "--activation": d["activation"], "--init-std": f"{d['init_std']:g}",
             "--loss": d["loss"], "--l1": f"{d['l1']:g}", "--l1-warmup": f"{d['l1_warmup']:g}",
             "--lr": f"{d['lr']:g}", "--epochs": f"{d['epochs']:g}",
             "--batch-size": d["batch_size"], "--grad-accum": d["grad_accum"]}
    for flag, value in shown.items():
        # the flag's line: the flag, its metavar or choices, then its help up to the next flag
        assert re.search(rf"{re.escape(flag)} \S+ (?:(?! --[a-z]).)*\(default {re.escape(str(value))}\)",
                         text), flag
    assert "(default: simpo 10, dpo 0.1)" in text  # --beta: each loss's own default


def test_rebuild_command_parses_back_to_the_same_config():
    """quality.json's `command` is a valid `fsrl sae train` line for the same settings."""
    cfg = SaeTrainConfig(text="corpus.txt", layer=5, out="sae", architecture="jumprelu",
                         sparsity_coefficient=0.3, lr=1e-3, unique_tokens=4096, name="x")
    argv = rebuild_command(cfg).split()[1:]
    assert build_config(parse(argv)) == cfg
