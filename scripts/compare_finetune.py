"""FSRL against full fine-tuning and LoRA with TRL's SimPO, on the same data, side by side.

    pip install -e '.[compare]'          # trl + peft
    python scripts/compare_finetune.py --train data/demo/concise/train.jsonl \
        --heldout data/demo/concise/heldout.jsonl --steps 27 --out docs/compare_finetune.json

Each method runs in its own process (so peak memory is its own) with the same pairs, the same
number of optimiser steps and the same effective batch (4 pairs x 2 accumulation), fp32 on the
CPU:
  full  TRL CPOTrainer, loss_type="simpo", cpo_alpha=0 (pure SimPO), every weight trained
  lora  the same with a peft LoRA (r 16, alpha 32, all attention and MLP projections)
  fsrl  `fsrl train` (SimPO + L1 on v), base model and SAE frozen
SimPO: beta 10, gamma 5 (gamma/beta 0.5; TRL's `simpo_gamma` is gamma itself). Afterwards every
trained model is scored by the same function, fsrl's own evaluation: held-out SimPO loss and
preference accuracy. Wall time is the training loop alone (model loading and evaluation
excluded); peak memory is the process's peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("full", "lora", "fsrl")
LEARNING_RATES = {"full": 1e-5, "lora": 2e-4, "fsrl": 1e-4}  # fsrl: the demo recipe's
BATCH, ACCUM, MAX_LENGTH, BETA, GAMMA = 4, 2, 256, 10.0, 5.0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _heldout_metrics(model, tokenizer, name: str, heldout: str, adapter=None) -> dict:
    """fsrl's evaluation (SimPO loss, accuracy) of a model, optionally with an FSRL adapter."""
    from fsrl.models import BaseModel, model_fingerprint
    from fsrl.sae import default_sae_dir, load_sae, random_sae
    from fsrl.train.data import PreferenceDataset, load_pairs
    from fsrl.train.config import TrainConfig
    from fsrl.train.trainer import bind_setup, evaluate

    base = BaseModel(model=model.eval().requires_grad_(False), tokenizer=tokenizer, name=name,
                     fingerprint=model_fingerprint(model))
    # Without an adapter nothing is steered: any SAE will do for the idle hook.
    sae = load_sae(default_sae_dir()) if adapter is not None else random_sae(base.d_model, 8, layer=0)
    setup = bind_setup(base, sae, None)
    cfg = TrainConfig(data=heldout, out="-", loss="simpo", beta=BETA, gamma=GAMMA,
                      max_length=MAX_LENGTH, batch_size=8, progress=False)
    ds = PreferenceDataset(load_pairs(heldout), tokenizer, MAX_LENGTH)
    with __import__("torch").no_grad():
        result = evaluate(base, setup.hook, adapter, ds, cfg)
    setup.hook.remove()
    return {"heldout_simpo_loss": round(result.loss, 4), "heldout_accuracy": round(result.accuracy, 4),
            "heldout_pairs": result.pairs, "mean_l0": round(result.mean_l0, 1) if adapter is not None else None}


def _trl_rows(path: str) -> list[dict]:
    from fsrl.train.data import load_pairs

    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in load_pairs(path)]


def run_trl(method: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from fsrl.models import ensure_default_model

    folder = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_config = None
    if method == "lora":
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])
    out_dir = tempfile.mkdtemp(prefix=f"fsrl-compare-{method}-")
    config = CPOConfig(
        output_dir=out_dir, loss_type="simpo", cpo_alpha=0.0, beta=BETA, simpo_gamma=GAMMA,
        learning_rate=LEARNING_RATES[method], max_steps=args.steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_length=MAX_LENGTH, lr_scheduler_type="cosine",
        warmup_steps=0.05, use_cpu=True, report_to="none", save_strategy="no", logging_steps=5,
        seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        # TRL turns both on by default; on a CPU bf16 autocast is slow and checkpointing re-runs
        # the forward. Every method here runs plain fp32 without recomputation.
        bf16=False, gradient_checkpointing=False)
    trainer = CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(_trl_rows(args.train)),
                         processing_class=tokenizer, peft_config=peft_config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = _rss_mib()
    trained = trainer.model.merge_and_unload() if method == "lora" else trainer.model
    metrics = _heldout_metrics(trained, tokenizer, f"{method}-simpo", args.heldout)
    return {"method": method, "trainable_parameters": trainable, "train_seconds": round(wall, 1),
            "peak_rss_mib": round(peak), "rss_before_training_mib": round(rss_before),
            "lr": LEARNING_RATES[method], **metrics}


def run_fsrl(args) -> dict:
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.train.config import TrainConfig
    from fsrl.train.trainer import bind_setup, train

    base = load_base_model(None, "cpu")
    setup = bind_setup(base, load_sae(default_sae_dir()), None)
    out_dir = tempfile.mkdtemp(prefix="fsrl-compare-fsrl-")
    cfg = TrainConfig(data=args.train, out=out_dir, eval_data=args.heldout, loss="simpo", beta=BETA,
                      gamma=GAMMA, l1=args.fsrl_l1, lr=LEARNING_RATES["fsrl"], max_steps=args.steps,
                      epochs=1e9, batch_size=BATCH, grad_accum=ACCUM, max_length=MAX_LENGTH,
                      seed=args.seed, device="cpu", progress=False)
    rss_before = _rss_mib()
    result = train(cfg, setup)
    peak = _rss_mib()
    setup.hook.remove()
    metrics = _heldout_metrics(base.model, base.tokenizer, base.name, args.heldout, adapter=result.adapter)
    base_metrics = _heldout_metrics(base.model, base.tokenizer, base.name, args.heldout)
    return {"method": "fsrl", "trainable_parameters": result.adapter.parameter_count(),
            "train_seconds": result.summary["train_seconds"], "peak_rss_mib": round(peak),
            "rss_before_training_mib": round(rss_before), "lr": LEARNING_RATES["fsrl"],
            "l1": args.fsrl_l1, **metrics, "base": base_metrics}


def worker(args) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = run_fsrl(args) if args.worker == "fsrl" else run_trl(args.worker, args)
    Path(args.result).write_text(json.dumps(result))


def table(results: list[dict], base: dict | None) -> str:
    rows = ["| method | trainable parameters | held-out SimPO loss | held-out preference accuracy "
            "| train wall time (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    if base:
        rows.append(f"| base model (no training) | 0 | {base['heldout_simpo_loss']:.4f} | "
                    f"{base['heldout_accuracy']:.3f} | - | - |")
    names = {"full": "TRL SimPO, full fine-tuning", "lora": "TRL SimPO, LoRA r16",
             "fsrl": "FSRL adapter (SimPO + L1)"}
    for r in results:
        if "error" in r:
            rows.append(f"| {names[r['method']]} | failed: {r['error']} | | | | |")
            continue
        rows.append(f"| {names[r['method']]} | {r['trainable_parameters']:,} | {r['heldout_simpo_loss']:.4f} | "
                    f"{r['heldout_accuracy']:.3f} | {r['train_seconds']:.0f} | {r['peak_rss_mib']:,} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="data/demo/concise/train.jsonl")
    parser.add_argument("--heldout", default="data/demo/concise/heldout.jsonl")
    parser.add_argument("--steps", type=int, default=27, help="optimiser steps (27: one epoch of the concise data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsrl-l1", type=float, default=5e-2, help="the concise recipe's L1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, help="torch CPU threads per run")
    parser.add_argument("--out", default="docs/compare_finetune.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    results, base = [], None
    for method in args.methods.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            result_path = fh.name
        cmd = [sys.executable, __file__, "--worker", method, "--result", result_path,
               "--train", args.train, "--heldout", args.heldout, "--steps", str(args.steps),
               "--seed", str(args.seed), "--fsrl-l1", str(args.fsrl_l1)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"running {method} ({args.steps} steps) ...", flush=True)
        done = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0:
            results.append({"method": method, "error": f"exit code {done.returncode}"})
            continue
        result = json.loads(Path(result_path).read_text())
        os.unlink(result_path)
        base = result.pop("base", base)
        results.append(result)
        print(json.dumps(result), flush=True)
    report = {"train": args.train, "heldout": args.heldout, "steps": args.steps,
              "pairs_per_step": BATCH * ACCUM, "max_length": MAX_LENGTH, "beta": BETA, "gamma": GAMMA,
              "threads": args.threads, "base": base, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(results, base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
