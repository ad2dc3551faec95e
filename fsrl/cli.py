"""The `fsrl` command line. Each subcommand lives in its own module as `add_arguments` + `run`;
this file only wires them and turns user-facing errors into one clear line. Packages built on
the library add commands through the `fsrl.commands` entry point group (the server adds
`serve`), so the library never names them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fsrl.errors import FsrlError

# (argv path, module implementing add_arguments(parser) and run(args) -> int | None, help;
#  "module:variant" for a module with several commands: add_<variant>_arguments, run_<variant>)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train",), "fsrl.train.cli", "train an FSRL adapter on preference data (SimPO/DPO)"),
    (("fetch-default",), "fsrl.commands.fetch_default", "fetch and convert the embedded default model"),
    (("sae", "train"), "fsrl.sae_training.cli", "train an SAE with sae-lens on a local model and corpus"),
    (("sae", "evaluate"), "fsrl.commands.sae_evaluate",
     "an SAE's explained variance and CE loss recovered on chat or other text, per corpus"),
    (("sae", "convert-gemma-scope"), "fsrl.commands.convert_gemma_scope",
     "convert a Gemma Scope params.npz folder into a sae-lens folder"),
    (("bench",), "fsrl.bench", "decode throughput, base vs steered; prints a table, writes JSON"),
    (("features", "build"), "fsrl.commands.features:build",
     "dashboards and rule labels for every feature of an SAE, from a corpus"),
    (("features", "label"), "fsrl.commands.features:label",
     "feature labels from an OpenAI-compatible endpoint or Neuronpedia explanations"),
    (("features", "classify"), "fsrl.commands.features:classify",
     "the paper's feature classes from an OpenAI-compatible endpoint, over the rule's"),
    (("features", "contrast"), "fsrl.commands.contrast:contrast",
     "the features that tell two sets of texts apart; optionally a constant adapter pushing them"),
    (("adapter", "constant"), "fsrl.commands.contrast:constant",
     "a constant adapter (no training) from a list of feature pushes"),
    (("adapter", "prune"), "fsrl.commands.prune",
     "an adapter cut to the features it pushes on held-out pairs: less memory, exact on those"),
    (("eval",), "fsrl.demo.against_prompt",
     "a demo adapter against its prompt baseline: base, instruction, adapter at 3 scales, a contrast push"),
    (("analyze",), "fsrl.commands.analyze",
     "the paper's audit of one adapter on preference pairs: report.json and report.html"),
]


PLUGIN_GROUP = "fsrl.commands"


def plugin_commands() -> list[tuple[tuple[str, ...], str, str]]:
    """Commands other installed packages add (entry point name "a.b" is `fsrl a b`); each
    one's help is its module docstring's first line (such modules keep their imports light)."""
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        doc = (importlib.import_module(ep.value.partition(":")[0]).__doc__ or "").strip()
        found.append((tuple(ep.name.split(".")), ep.value, doc.splitlines()[0] if doc else ""))
    return found


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end in one line naming the problem, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _entry(module: str, name: str):
    """`module`'s `name` function; "module:variant" names `<name-start>_<variant>` (run_build,
    add_build_arguments) for modules that hold several commands."""
    path, _, variant = module.partition(":")
    loaded = importlib.import_module(path)
    if not variant:
        return getattr(loaded, name)
    return getattr(loaded, f"run_{variant}" if name == "run" else f"add_{variant}_arguments")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """All commands are listed; only the one named in argv imports its module for its flags."""
    parser = _OneLineParser(prog="fsrl", description="fsrl: steer a frozen language model through "
                            "the features of a sparse autoencoder, and serve it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    groups: dict[str, argparse._SubParsersAction] = {}
    words = [a for a in argv if not a.startswith("-")]
    for path, module, help_text in [*plugin_commands(), *COMMANDS]:
        subparsers = top
        for part in path[:-1]:
            if part not in groups:
                groups[part] = top.add_parser(part, help=f"{part} commands").add_subparsers(
                    dest=f"{part}_command", required=True, parser_class=_OneLineParser)
            subparsers = groups[part]
        sub = subparsers.add_parser(path[-1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        if tuple(words[:len(path)]) == path:
            _entry(module, "add_arguments")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = _entry(args._module, "run")(args)
    except FsrlError as exc:
        print(f"fsrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsrl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"fsrl: error: {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
