"""`fsrl sae train` end to end on a tiny random llama, a self-made tokenizer and a tiny corpus."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from fsrl import cli, corpus
from fsrl.errors import FsrlError

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "saw", "one", "dog", "run", "to", "big",
         "red", "house", "while", "small", "birds", "sing", "in", "green", "trees", "near", "old",
         "river", "stone"]
SPECIALS = ["<unk>", "<|endoftext|>", "<pad>"]


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + " ."
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random llama (hidden 32) and a word-level tokenizer, saved like a hub folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)) + ["."])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|endoftext|>", pad_token="<pad>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, eos_token_id=vocab["<|endoftext|>"],
                      pad_token_id=vocab["<pad>"], bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    text = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    # two documents, each many short paragraphs
    docs = ["\n\n".join(_sentences(150, seed)) for seed in (1, 2)]
    text.write_text(f"\n{corpus.DOC_SEPARATOR}\n".join(docs))
    return text


def _train(model_dir, text, out, *extra: str) -> None:
    code = cli.main(["sae", "train", "--text", str(text), "--layer", "1", "--out", str(out),
                     "--model", str(model_dir), "--d-sae", "64", "--k", "8",
                     "--batch-size", "64", "--training-tokens", "512", "--context-size", "16",
                     "--store-batch-size", "4", "--eval-tokens", "512", "--ce-tokens", "128",
                     "--eval-fraction", "0.2", "--device", "cpu", "--dead-feature-window", "2",
                     *extra])
    assert code == 0


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """One run over an activation cache (256 unique tokens, two epochs), shared below."""
    out = tmp_path_factory.mktemp("sae-train") / "sae"
    _train(tiny_model_dir, tiny_corpus, out, "--unique-tokens", "256", "--dtype", "float32")
    return out


@pytest.mark.slow  # trains with sae-lens
def test_train_writes_a_sae_lens_folder_our_reader_loads(trained):
    from fsrl.sae import load_sae

    sae = load_sae(trained)
    assert (sae.d_in, sae.d_sae, sae.architecture, sae.k) == (32, 64, "topk", 8)
    assert sae.info.layer == 1 and sae.info.hook_name == "model.layers.1"
    cfg = json.loads((trained / "cfg.json").read_text())
    assert cfg["metadata"]["seqpos_slice"] == [1, None]
    assert cfg["metadata"]["prepend_bos"] is False


@pytest.mark.slow  # trains with sae-lens
def test_quality_json_has_sane_figures(trained):
    q = json.loads((trained / "quality.json").read_text())
    assert q["explained_variance"] <= 1.0 and q["explained_variance"] > -1.0
    assert 0 < q["l0_mean"] <= 8
    assert 0.0 <= q["dead_feature_share"] <= 1.0
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation"):
        assert q[key] > 0
    assert q["ce_loss_recovered"] is None or -50 < q["ce_loss_recovered"] < 50
    assert q["tokens_trained"] == 512 and q["unique_tokens_trained"] == 256
    assert q["eval_tokens"] > 0 and q["ce_eval_tokens"] > 0
    excluded = q["excluded_from_training_and_eval"]
    assert excluded["positions"] == [0] and excluded["token_ids"] == [0, 1, 2]
    assert excluded["activation_norm_above"] > 0
    assert 0 < q["eval_positions_excluded_share"] < 0.5
    assert q["sae_lens_parity_max_abs_diff"] < 1e-4
    assert q["command"].startswith("fsrl sae train --text ")


@pytest.mark.slow  # trains with sae-lens
def test_our_encode_decode_equals_sae_lens(trained):
    from sae_lens import SAE

    from fsrl.sae import load_sae

    ours = load_sae(trained)
    theirs = SAE.load_from_disk(str(trained), device="cpu", dtype="float32")
    x = torch.randn(50, 32) * 3
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        torch.testing.assert_close(f_ours, f_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(f_ours), theirs.decode(f_theirs),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # trains with sae-lens
def test_streaming_run_saves_float16_weights(tiny_model_dir, tiny_corpus, tmp_path):
    """--unique-tokens 0: sae-lens streams fresh activations for every batch."""
    from safetensors.torch import load_file

    from fsrl.sae import load_sae

    _train(tiny_model_dir, tiny_corpus, tmp_path / "sae", "--unique-tokens", "0")
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert load_sae(tmp_path / "sae").W_enc.dtype == torch.float32
    q = json.loads((tmp_path / "sae" / "quality.json").read_text())
    assert q["unique_tokens_trained"] == q["tokens_trained"] == 512


def test_missing_corpus_fails_with_one_line(tmp_path, capsys):
    code = cli.main(["sae", "train", "--text", str(tmp_path / "nope.txt"), "--layer", "0",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "corpus not found" in err


def test_unknown_builtin_corpus_is_a_user_error():
    with pytest.raises(FsrlError, match="builtin:system-docs"):
        corpus.load_documents("builtin:nothing")


def test_corpus_txt_splits_documents_and_chunks_paragraphs(tmp_path):
    path = tmp_path / "c.txt"
    corpus.write_txt(["a b\n\nc d", "e f"], path)
    assert corpus.load_documents(str(path)) == ["a b\n\nc d", "e f"]
    chunks = corpus.chunk_documents(["aaaa\n\nbbbb\n\ncccc"], chunk_chars=10)
    assert chunks == ["aaaa\n\nbbbb", "cccc"]


def test_markup_strippers_keep_prose():
    page = ("<html><nav>menu</nav><main><h1>Title</h1><p>Some <em>prose</em> here.</p>"
            "<pre><code>fn main() {}</code></pre><p>More &amp; more.</p></main></html>")
    assert corpus.html_to_text(page) == "Title\n\nSome prose here.\n\nMore & more."


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man-db (Debian's man)")
def test_man_pages_are_rendered_by_man_without_header_and_footer(tmp_path):
    page = tmp_path / "x.1"
    page.write_text('.TH X 1 2026 fsrl "Tests"\n.SH NAME\nx \\- do \\fBthings\\fR\n.PP\n.BR grep (1)\nis fine.\n')
    assert corpus.man_to_text(page) == "NAME\n\nx - do things\n\ngrep(1) is fine."


@pytest.mark.slow  # trains with sae-lens
def test_sae_evaluate_adds_per_corpus_figures_equal_to_a_direct_evaluation(trained, tiny_model_dir, tmp_path):
    """`fsrl sae evaluate` on chat rows: the figures are evaluate_sae's on the same packed
    tokens with the SAE's own exclusions, written under quality.json's "by_corpus"."""
    import shutil

    from fsrl.models import load_base_model
    from fsrl.sae import load_sae
    from fsrl.sae_training.evaluation import evaluate_sae, pack_contexts
    from fsrl.sae_training.exclusions import Exclusions, separator_token_id

    sae_dir = tmp_path / "sae"
    shutil.copytree(trained, sae_dir)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"prompt": a, "text": b})
                              for a, b in zip(_sentences(40, 5), _sentences(40, 6))) + "\n")
    before = json.loads((sae_dir / "quality.json").read_text())
    assert cli.main(["sae", "evaluate", "--sae", str(sae_dir), "--model", str(tiny_model_dir), "--chat", str(chat),
                     "--eval-tokens", "256", "--ce-tokens", "64", "--device", "cpu"]) == 0
    after = json.loads((sae_dir / "quality.json").read_text())
    figures = after["by_corpus"][f"chat:{chat}"]
    assert {k: v for k, v in after.items() if k != "by_corpus"} == before  # training figures stay

    base = load_base_model(str(tiny_model_dir), device="cpu")
    meta = json.loads((sae_dir / "cfg.json").read_text())["metadata"]
    rows = [f"{a}\n\n{b}" for a, b in zip(_sentences(40, 5), _sentences(40, 6))]  # no chat template: plain
    tokens = pack_contexts(base.tokenizer, rows, meta["context_size"], separator_token_id(base.tokenizer), 256)
    excl = Exclusions(meta["excluded_token_ids"], meta["excluded_activation_norm_above"])
    assert figures == evaluate_sae(base, load_sae(sae_dir), 1, tokens, excl, ce_tokens=64)


def test_mix_rows_holds_the_chat_share_in_every_prefix_and_keeps_each_order():
    text = [f"t{i:02d}" + "x" * 97 for i in range(40)]   # 100 characters each
    chat = [f"c{i:02d}" + "y" * 47 for i in range(60)]   # 50 characters each
    mixed = corpus.mix_rows(text, chat, 0.25)
    assert [r for r in mixed if r[0] == "t"] == text and [r for r in mixed if r[0] == "c"] == chat
    chat_chars = total = 0
    for row in mixed[:-1]:
        chat_chars += len(row) if row[0] == "c" else 0
        total += len(row)
        if total - chat_chars < sum(map(len, text)):  # while both last: within one row of 25 %
            assert abs(chat_chars - 0.25 * total) <= 100
    assert corpus.mix_rows(text, [], 0.5) == text


def test_rst_to_text_keeps_prose_and_drops_code_and_markup():
    page = """\
.. _sessions:

==============
Using sessions
==============

Django *stores* sessions in your database (see :doc:`the cache docs </topics/cache>`
and :class:`~django.contrib.sessions.models.Session`). Use ``SESSION_ENGINE``::

    SESSION_ENGINE = "cache"

.. code-block:: python

    request.session["k"] = 1

.. note::
   :class: small

   Sessions are **lazy**; see `the guide <https://example.org>`_.

* one item
* two items
"""
    assert corpus.rst_to_text(page) == (
        "Using sessions\n\n"
        "Django stores sessions in your database (see the cache docs and Session). "
        "Use SESSION_ENGINE:\n\n"
        "Sessions are lazy; see the guide.\n\n"
        "* one item\n* two items")


def test_django_docs_archive_with_another_digest_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FSRL_CACHE_DIR", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / corpus.DJANGO_SDIST).write_bytes(b"not the archive")
    with pytest.raises(FsrlError, match="expected de450c09e91879fa"):
        corpus.load_documents("builtin:django-docs")


@pytest.mark.slow  # trains with sae-lens
def test_chat_mixed_into_training_is_evaluated_apart_from_the_text(tiny_model_dir, tiny_corpus, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"prompt": a, "text": b})
                              for a, b in zip(_sentences(60, 7), _sentences(60, 8))) + "\n")
    out = tmp_path / "sae"
    # a text row is a 3,000-character chunk: the share is measured over enough rows to show
    _train(tiny_model_dir, tiny_corpus, out, "--chat", str(chat), "--chat-share", "0.4",
           "--unique-tokens", "4096", "--training-tokens", "4096")
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["by_corpus"]) == {f"held-out {tiny_corpus}", f"held-out chat:{chat}"}
    for figures in quality["by_corpus"].values():
        assert 0 < figures["eval_tokens"] and -1 < figures["explained_variance"] <= 1
    assert 0.2 < quality["trained_chat_share"] < 0.6
    assert "--chat " + str(chat) in quality["command"] and "--chat-share 0.4" in quality["command"]
