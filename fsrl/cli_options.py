"""Command-line options whose defaults are a config dataclass's field defaults.

A command that fills a config dataclass adds its options through `ConfigOptions`: an option
whose destination names a field takes that field's default (and is required when the field has
none), and the config is built back from the parsed arguments field by field. So a default is
written once, in the dataclass, and the command line cannot drift from it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Generic, Protocol, TypeVar

Config = TypeVar("Config")


class AddsArguments(Protocol):
    """A parser or an argument group."""

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action: ...


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field of dataclass `cls` that has a default -> that default."""
    found = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return found


class ConfigOptions(Generic[Config]):
    """Adds options for the fields of the config dataclass `cls` and builds it from them."""

    def __init__(self, cls: type[Config]):
        self.cls = cls
        self.names = {f.name for f in dataclasses.fields(cls)}
        self.defaults = field_defaults(cls)

    def add(self, parser: AddsArguments, *flags: str, **kwargs: Any) -> argparse.Action:
        """`parser.add_argument(*flags, **kwargs)`, the default taken from the field the option
        fills (its dest); options that fill no field pass through unchanged."""
        dest = kwargs.get("dest") or _dest(flags)
        if dest in self.names:
            if "default" in kwargs:
                raise TypeError(f"option {flags[0]}: its default is {self.cls.__name__}.{dest}'s; "
                                "do not restate it")
            if dest in self.defaults:
                kwargs["default"] = self.defaults[dest]
            elif flags[0].startswith("-"):
                kwargs["required"] = True
        return parser.add_argument(*flags, **kwargs)

    def config(self, args: argparse.Namespace) -> Config:
        """The config from parsed arguments: every field an option filled, the rest at their
        defaults."""
        given = vars(args)
        return self.cls(**{name: given[name] for name in self.names if name in given})


def _dest(flags: tuple[str, ...]) -> str:
    """The dest argparse derives: the first long flag, else the first flag, without dashes."""
    long = [f for f in flags if f.startswith("--")]
    return (long or list(flags))[0].lstrip("-").replace("-", "_")
