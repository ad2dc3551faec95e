"""`fsrl sae convert-gemma-scope`: a Gemma Scope params.npz folder -> a sae-lens folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("npz_dir", help="folder holding params.npz (or the file itself)")
    parser.add_argument("out_dir", help="where to write cfg.json + sae_weights.safetensors")
    parser.add_argument("--layer", type=int, required=True, help="residual layer the SAE reads")
    parser.add_argument("--model-name", default="google/gemma-2-2b-it")


def run(args: argparse.Namespace) -> int:
    from fsrl.sae import convert_gemma_scope, load_sae

    out = convert_gemma_scope(args.npz_dir, args.out_dir, layer=args.layer, model_name=args.model_name)
    sae = load_sae(out)
    print(f"wrote {out}: jumprelu SAE d_in={sae.d_in} d_sae={sae.d_sae} layer={args.layer} "
          f"fingerprint={sae.info.fingerprint}")
    return 0
