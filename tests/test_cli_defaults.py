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


# --- fsrl serve: every flag from a Settings field -------------------------------------------------

def test_every_serve_setting_is_a_flag_with_its_help_and_no_default_of_its_own():
    """A flag per field but the secrets; argparse defaults are None (a flag left out leaves the
    FSRL_* variable or the field's default in force), so the settings built from no flag are
    Settings' own defaults."""
    from server.settings import Settings, flag_specs, load_settings

    args = vars(parse(["serve"]))
    fields = set(Settings.model_fields) - {"api_key", "admin_key"}
    assert fields <= set(args) and all(args[name] is None for name in fields)
    built = load_settings(**{spec.name: args.get(spec.name) for spec in flag_specs()})
    assert built == Settings()
    help_text = cli.build_parser(["serve", "-h"])._subparsers._group_actions[0].choices["serve"].format_help()
    for spec in flag_specs():
        if spec.name in fields:
            assert spec.flag in help_text and spec.help.split()[0] in help_text, spec.flag


def test_flags_reach_the_settings_and_engine_specific_defaults_are_stated_once(monkeypatch):
    from server.settings import VLLM_DEFAULT_ADAPTER_SLOTS, Settings, flag_specs, load_settings

    args = parse(["serve", "--max-queue", "7", "--no-pack-cpu-weights", "--engine", "vllm", "--enforce-eager",
                  "--stream-send-timeout", "2.5", "--adapters-dir", "elsewhere"])
    built = load_settings(**{spec.name: getattr(args, spec.name, None) for spec in flag_specs()})
    assert (built.max_queue, built.pack_cpu_weights, built.engine, built.enforce_eager, built.stream_send_timeout,
            str(built.adapters_dir)) == (7, False, "vllm", True, 2.5, "elsewhere")
    assert built.adapter_slots == VLLM_DEFAULT_ADAPTER_SLOTS and Settings().adapter_slots == 0
    assert built.max_adapters == Settings().max_adapters == 64
    shown = next(spec.shown for spec in flag_specs() if spec.name == "adapter_slots")
    assert f"`{VLLM_DEFAULT_ADAPTER_SLOTS}` with `--engine vllm`" in shown and "`0`" in shown


def test_the_flag_table_in_docs_api_md_is_the_generated_one():
    from pathlib import Path

    from server.settings import flag_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    assert flag_table() in docs, "regenerate it: python -m server.settings"
