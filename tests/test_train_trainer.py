"""The trainer on a tiny random model: step 0 is the base model, gradients reach only the
adapter, resume equals an uninterrupted run, `fsrl train` end to end, a Gemma-2-shaped model."""

import json

import numpy as np
import pytest
import torch

from fsrl.testing import tiny_base, tiny_pairs, tiny_sae, tiny_tokenizer
from fsrl.adapter import load_adapter, new_adapter
from fsrl.cli import main
from fsrl.models import BaseModel, model_fingerprint
from fsrl.sae import convert_gemma_scope, load_sae, save_sae
from fsrl.steering import RowSteering, SteeringBatch
from fsrl.train.data import PreferenceDataset, load_pairs
from fsrl.train.config import TrainConfig
from fsrl.train.trainer import bind_setup, evaluate, preference_loss, train

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    return bind_setup(tiny_base(), tiny_sae(layer=LAYER), LAYER)


@pytest.fixture()
def data(tmp_path):
    return tiny_pairs(tmp_path / "prefs.jsonl")


def config(tmp_path, data, **kw):
    kw.setdefault("out", str(tmp_path / "adapter"))
    base = dict(data=str(data), batch_size=4, grad_accum=2, max_length=64, lr=1e-2, l1=1e-3,
                device="cpu", progress=False, eval_limit=8)
    return TrainConfig(**{**base, **kw})


def test_step_zero_adapter_is_the_base_model(setup, tmp_path, data):
    cfg = config(tmp_path, data)
    adapter = new_adapter("a", setup.sae, setup.base.name, setup.base.fingerprint, LAYER,
                          init_std=cfg.init_std, seed=0)
    ids = torch.randint(3, 100, (2, 12))
    plain = setup.base.model(input_ids=ids).logits
    batch = SteeringBatch.build([RowSteering(adapter)] * 2, setup.sae.d_sae)
    with setup.hook.steering(batch, torch.arange(12).expand(2, -1)):
        steered = setup.base.model(input_ids=ids).logits
    # init_std 1e-6: the push is ~1e-6 of the residual; logits (scale ~8 here) move < 5e-4.
    torch.testing.assert_close(steered, plain, rtol=0, atol=5e-4)
    assert torch.equal(steered.argmax(-1), plain.argmax(-1))
    ds = PreferenceDataset(load_pairs(data), setup.base.tokenizer, 64)
    at_zero, base_only = evaluate(setup.base, setup.hook, adapter, ds, cfg), \
        evaluate(setup.base, setup.hook, None, ds, cfg)
    assert at_zero.loss == pytest.approx(base_only.loss, abs=1e-4)
    assert at_zero.accuracy == base_only.accuracy


@pytest.mark.parametrize("activation", ["relu", "soft_threshold"])
def test_gradients_reach_the_adapter_and_nothing_else(setup, tmp_path, data, activation):
    cfg = config(tmp_path, data, activation=activation, loss="dpo")
    adapter = new_adapter("a", setup.sae, setup.base.name, setup.base.fingerprint, LAYER,
                          activation=activation, init_std=1e-3)
    ds = PreferenceDataset(load_pairs(data), setup.base.tokenizer, 64)
    total, stats, fwd = preference_loss(setup.base, setup.hook, adapter, ds.batch([0, 1, 2]), cfg, 0.5)
    total.backward()
    assert adapter.W.grad.abs().sum() > 0 and adapter.b.grad.abs().sum() > 0
    if activation == "soft_threshold":
        assert adapter.tau.grad.abs().sum() > 0
    assert all(p.grad is None for p in setup.base.model.parameters())
    assert stats.loss == pytest.approx(np.log(2), abs=1e-2)   # DPO near init: policy ~ reference
    assert fwd.l1 is not None and stats.l0 > 0


def test_the_nll_term_adds_nll_times_the_chosen_answers_mean_negative_log_likelihood(setup, tmp_path, data):
    adapter = new_adapter("a", setup.sae, setup.base.name, setup.base.fingerprint, LAYER, init_std=1e-3)
    ds = PreferenceDataset(load_pairs(data), setup.base.tokenizer, 64)
    batch = ds.batch([0, 1, 2])
    plain, stats, fwd = preference_loss(setup.base, setup.hook, adapter, batch, config(tmp_path, data), 0.0)
    with_nll, stats_nll, _ = preference_loss(setup.base, setup.hook, adapter, batch,
                                             config(tmp_path, data, nll=0.5), 0.0)
    chosen_nll = -fwd.logps.mean[:3].mean()           # rows 0-2 are the chosen answers
    assert float(chosen_nll) > 0
    assert float(with_nll) == pytest.approx(float(plain + 0.5 * chosen_nll), rel=1e-5)
    assert stats_nll.loss == pytest.approx(stats.loss, rel=1e-6)   # reported: the preference loss alone


def test_training_lowers_the_loss_and_writes_a_loadable_adapter(setup, tmp_path, data):
    result = train(config(tmp_path, data, epochs=4, l1_warmup=0.5), setup)
    s = result.summary
    assert s["steps"] == 12 and s["final_eval_loss"] < s["initial_eval"]["loss"]
    adapter = load_adapter(tmp_path / "adapter", sae=setup.sae, layer=LAYER,
                           base_model_fingerprint=setup.base.fingerprint)
    t = adapter.config.training
    for key in ("data", "steps", "loss", "l1_coefficient", "beta", "gamma", "final_eval_loss", "mean_l0"):
        assert key in t
    assert t["beta"] == 10.0 and t["gamma"] == 5.0 and t["top_features"]
    history = json.loads((tmp_path / "adapter" / "train_history.json").read_text())
    assert [h["l1_coef"] for h in history if "l1_coef" in h] == [0.0] * 6 + [1e-3] * 6


def test_resume_equals_an_uninterrupted_run(setup, tmp_path, data):
    full = train(config(tmp_path, data, out=str(tmp_path / "full"), epochs=2, save_every=2), setup)
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000004"
    assert ckpt.exists()
    resumed = train(config(tmp_path, data, out=str(tmp_path / "resumed"), epochs=2, save_every=2,
                           resume=str(ckpt)), setup)
    assert resumed.summary["steps"] == full.summary["steps"] == 6
    torch.testing.assert_close(resumed.adapter.W, full.adapter.W, rtol=0, atol=1e-7)
    torch.testing.assert_close(resumed.adapter.b, full.adapter.b, rtol=0, atol=1e-7)
    # a checkpoint from other settings is refused by name
    from fsrl.errors import FsrlError
    with pytest.raises(FsrlError, match="lr"):
        train(config(tmp_path, data, out=str(tmp_path / "x"), epochs=2, lr=0.5, resume=str(ckpt)), setup)


def save_tiny(tmp_path, base, sae):
    model_dir, sae_dir = tmp_path / "tiny-model", tmp_path / "tiny-sae"
    base.model.save_pretrained(model_dir)
    base.tokenizer.save_pretrained(model_dir)
    save_sae(sae, sae_dir)
    return model_dir, sae_dir


def test_fsrl_train_command_end_to_end(tmp_path, data, capsys):
    base, sae = tiny_base(), tiny_sae(layer=LAYER)
    model_dir, sae_dir = save_tiny(tmp_path, base, sae)
    tiny_pairs(tmp_path / "eval.jsonl", n=6)
    out = tmp_path / "adapters" / "demo"
    code = main(["train", "--data", str(data), "--eval-data", str(tmp_path / "eval.jsonl"),
                 "--out", str(out), "--model", str(model_dir), "--sae", str(sae_dir),
                 "--max-steps", "3", "--max-length", "64", "--device", "cpu", "--no-progress",
                 "--loss", "dpo", "--activation", "soft_threshold", "--l1", "0.01"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "adapter written" in printed and "mean L0 of v" in printed
    served = load_sae(sae_dir)
    adapter = load_adapter(out, sae=served, layer=LAYER, base_model_fingerprint=model_fingerprint(base.model))
    assert adapter.config.activation == "soft_threshold" and adapter.config.training["steps"] == 3
    assert adapter.config.training["loss"] == "dpo" and adapter.config.training["gamma"] is None


def test_tiny_gemma2_with_converted_gemma_scope_sae_trains(tmp_path, data):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=256, sliding_window=16, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    base = BaseModel(model=model, tokenizer=tiny_tokenizer(), name="tiny-gemma2",
                     fingerprint=model_fingerprint(model))
    # A Gemma Scope style params.npz (JumpReLU, no b_dec on the input), converted offline.
    rng = np.random.default_rng(0)
    npz_dir = tmp_path / "layer_1" / "width_128"
    npz_dir.mkdir(parents=True)
    w_dec = rng.standard_normal((128, 32)).astype(np.float32)
    np.savez(npz_dir / "params.npz", W_enc=w_dec.T.copy(), W_dec=w_dec, b_enc=np.zeros(128, np.float32),
             b_dec=np.zeros(32, np.float32), threshold=np.full(128, 0.1, np.float32))
    sae = load_sae(convert_gemma_scope(npz_dir, tmp_path / "sae", layer=1))
    result = train(config(tmp_path, data, max_steps=1, batch_size=2, grad_accum=1), bind_setup(base, sae, None))
    assert result.summary["steps"] == 1 and np.isfinite(result.summary["final_eval_loss"])
    assert load_adapter(tmp_path / "adapter", sae=sae, layer=1).config.layer == 1


@pytest.mark.slow
def test_two_processes_train_the_adapter_a_single_process_trains_on_the_same_global_batch(tmp_path, data):
    """`torchrun --nproc-per-node 2` (gloo, CPU): each process takes half of every step's pairs
    and the adapter's gradients are summed across them, so after 3 steps the adapter equals one
    process training on the whole global batch (4 pairs a step; L1 off, since its per-micro-batch
    token mean is the one thing that depends on how a step's pairs are split)."""
    import os
    import subprocess
    import sys

    from fsrl.testing.server_process import free_port

    base, sae = tiny_base(), tiny_sae(layer=LAYER)
    model_dir, sae_dir = save_tiny(tmp_path, base, sae)
    common = ["--data", str(data), "--model", str(model_dir), "--sae", str(sae_dir), "--max-steps", "3",
              "--max-length", "64", "--device", "cpu", "--no-progress", "--l1", "0", "--lr", "1e-2",
              "--grad-accum", "1", "--eval-limit", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "fsrl.cli", "train", *common, "--batch-size", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "fsrl.cli", "train", *common,
                          "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_adapter(tmp_path / name, sae=load_sae(sae_dir)) for name in ("one", "two"))
    assert b.config.training["processes"] == 2 and b.config.training["effective_batch"] == 4
    assert a.config.training["effective_batch"] == 4
    assert not torch.equal(a.W, torch.zeros_like(a.W))
    # Summation order differs between the runs; Adam divides by sqrt(v), so an entry with a
    # near-zero gradient can move ~1e-5 apart. A missing all-reduce moves W by ~lr = 1e-2.
    torch.testing.assert_close(b.W, a.W, rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(b.b, a.b, rtol=1e-3, atol=2e-5)


def test_a_constant_push_trains_its_b_alone_and_saves_as_a_constant_adapter(setup, tmp_path, data):
    """`fsrl train --activation constant`: v = b at every position, b learned (no map)."""
    result = train(config(tmp_path, data, epochs=4, activation="constant", l1_warmup=1.0), setup)
    s = result.summary
    assert s["final_eval_loss"] < s["initial_eval"]["loss"]
    adapter = load_adapter(tmp_path / "adapter", sae=setup.sae, layer=LAYER,
                           base_model_fingerprint=setup.base.fingerprint)
    assert adapter.config.activation == "constant" and adapter.parameter_count() == setup.sae.d_sae
    x = torch.randn(3, setup.sae.d_in)
    v = adapter(x)
    assert torch.equal(v, adapter.b.expand_as(v)) and adapter.b.abs().sum() > 0
