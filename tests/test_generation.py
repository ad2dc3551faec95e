"""Batched generation: per-row steering, sampling, seeds and stop conditions."""

import pytest
import torch

from fsrl.testing import tiny_adapter, tiny_base, tiny_sae
from fsrl.generation import GenerationRequest, Generator, _held_back
from fsrl.sampling import SamplingParams
from fsrl.overrides import FeatureOverride
from fsrl.steering import RowSteering

LAYER = 1


@pytest.fixture(scope="module")
def gen():
    base = tiny_base()
    sae = tiny_sae(layer=LAYER)
    g = Generator(base, sae, LAYER)
    g.adapter = tiny_adapter(sae, base)
    return g


def ids(gen, text):
    return gen.base.tokenizer(text)["input_ids"]


def request(gen, text="hello there", steering=None, **sampling):
    sampling.setdefault("max_new_tokens", 10)
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(ids(gen, text), steering or RowSteering(), SamplingParams(**sampling))


def test_unsteered_greedy_matches_transformers_generate(gen):
    prompt = ids(gen, "the cat sat")
    ref = gen.base.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = gen.generate([GenerationRequest(prompt, RowSteering(), SamplingParams(max_new_tokens=8, ignore_eos=True))])
    assert out[0].token_ids == ref


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.75), (0.5, 0.5), (-1.0, 0.0)])
def test_penalties_take_off_presence_once_and_frequency_per_time_a_generated_token_appeared(gen, presence, frequency):
    prompt = ids(gen, "the cat sat")
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(20):  # the reference: the whole context through the model each step, float64
            logits = gen.base.model(input_ids=torch.tensor([prompt + expected])).logits[0, -1].double()
            for token in set(expected):
                logits[token] -= presence + frequency * expected.count(token)
            expected.append(int(logits.argmax()))
    got = gen.generate([request(gen, "the cat sat", max_new_tokens=20, presence_penalty=presence,
                                frequency_penalty=frequency)])[0]
    assert got.token_ids == expected
    plain = gen.generate([request(gen, "the cat sat", max_new_tokens=20)])[0]
    assert plain.token_ids != expected   # not vacuous: the penalties change this answer


def test_mixed_batch_rows_equal_each_row_alone(gen):
    reqs = [request(gen, "hello there", RowSteering(gen.adapter)),
            request(gen, "hi"),
            request(gen, "a longer prompt here", RowSteering(None, 1.0, [FeatureOverride(3, "set", 6.0)])),
            request(gen, "seeded", RowSteering(gen.adapter, 2.0), temperature=1.0, seed=11, top_k=20),
            request(gen, "nucleus", temperature=0.8, seed=5, top_p=0.9),
            request(gen, "penalised", presence_penalty=1.0, frequency_penalty=0.3)]
    together = gen.generate(reqs)
    for req, got in zip(reqs, together):
        assert gen.generate([req])[0].token_ids == got.token_ids


def test_steering_changes_tokens_and_base_row_does_not(gen):
    steered, base = gen.generate([request(gen, steering=RowSteering(gen.adapter, 3.0)), request(gen)])
    assert steered.token_ids != base.token_ids
    assert gen.generate([request(gen)])[0].token_ids == base.token_ids


def test_same_seed_same_sample_and_other_seed_differs(gen):
    a = gen.generate([request(gen, temperature=1.0, seed=1, max_new_tokens=16)])[0]
    b = gen.generate([request(gen, temperature=1.0, seed=1, max_new_tokens=16)])[0]
    c = gen.generate([request(gen, temperature=1.0, seed=2, max_new_tokens=16)])[0]
    assert a.token_ids == b.token_ids != c.token_ids


def test_generated_positions_only_leaves_first_token_to_base(gen):
    prompt = ids(gen, "hello there")
    generated_only = RowSteering(gen.adapter, 3.0, steer_from=len(prompt))
    out, base = gen.generate([GenerationRequest(prompt, generated_only, SamplingParams(max_new_tokens=8, ignore_eos=True)),
                              GenerationRequest(prompt, RowSteering(), SamplingParams(max_new_tokens=8, ignore_eos=True))])
    assert out.token_ids[0] == base.token_ids[0]
    assert out.token_ids != base.token_ids


def test_max_new_tokens_gives_length(gen):
    out = gen.generate([request(gen, max_new_tokens=5)])[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5


def test_stop_string_cuts_text_and_stops(gen):
    free = gen.generate([request(gen, max_new_tokens=12)])[0]
    stop = free.text[3:5]
    cut = gen.generate([request(gen, max_new_tokens=12, stop=(stop,))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]


def test_eos_stops_unless_ignored(gen):
    eos = gen.base.tokenizer.eos_token_id
    # Force EOS as the first token through a huge bias on its logit.
    bias = torch.zeros(gen.base.model.config.vocab_size)
    bias[eos] = 1e4
    head = gen.base.model.get_output_embeddings()
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        stopped = gen.generate([request(gen, ignore_eos=False)])[0]
        ignored = gen.generate([request(gen, ignore_eos=True, max_new_tokens=4)])[0]
    finally:
        head.bias = None
    assert stopped.finish_reason == "stop" and stopped.token_ids == [eos] and stopped.text == ""
    assert ignored.finish_reason == "length" and ignored.completion_tokens == 4


def test_return_features_gives_one_list_per_token(gen):
    req = request(gen, steering=RowSteering(gen.adapter), max_new_tokens=6)
    req.return_features = 3
    out = gen.generate([req, request(gen)])
    assert len(out[0].features) == 6
    assert all(1 <= len(f) <= 3 for f in out[0].features)
    assert out[1].features is None


def test_streamed_text_equals_final_text_with_stop_strings(gen):
    free = gen.generate([request(gen, max_new_tokens=12)])[0]
    stop = free.text[4:7]
    events = list(gen.stream([request(gen, max_new_tokens=12, stop=(stop,))]))
    assert "".join(e.text_delta for e in events) == events[-1].text


def test_held_back_text_is_a_possible_stop_prefix():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("abc\ufffd", []) == 1


def run_staggered(gen, reqs, join_at):
    """Continuous batching by hand: request i joins after join_at[i] decode steps."""
    running = gen.batch()
    tokens: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    step = 0
    while step < 200 and (running or any(t == [] for t in tokens.values())):
        for i, req in enumerate(reqs):
            if join_at[i] == step:
                for owner, event in running.add([req], owners=[i]):
                    tokens[owner].append(event.token_id)
        for owner, event in running.step():
            tokens[owner].append(event.token_id)
        step += 1
    return [tokens[i] for i in range(len(reqs))]


def test_rows_joining_mid_generation_equal_each_row_alone(gen):
    reqs = [request(gen, "hello there", RowSteering(gen.adapter), max_new_tokens=12),
            request(gen, "a much longer prompt than the rest", max_new_tokens=5),
            request(gen, "hi", RowSteering(None, 1.0, [FeatureOverride(3, "set", 6.0)]), max_new_tokens=9),
            request(gen, "seeded", RowSteering(gen.adapter, 2.0), temperature=1.0, seed=11, top_k=20),
            request(gen, "x", max_new_tokens=1)]
    got = run_staggered(gen, reqs, join_at=[0, 2, 3, 3, 7])
    for req, tokens in zip(reqs, got):
        assert tokens == gen.generate([req])[0].token_ids


def test_finished_rows_leave_and_the_cache_sheds_their_padding(gen):
    running = gen.batch()
    running.add([request(gen, "a much longer prompt than the rest", max_new_tokens=2)], owners=["long"])
    running.add([request(gen, "hi", max_new_tokens=6)], owners=["short"])
    assert len(running) == 2 and running.attention_mask.shape[1] == len(ids(gen, "a much longer prompt than the rest"))
    running.step()  # the long row's second token: it finishes and leaves
    assert [row.owner for row in running.rows] == ["short"]
    # Only the short row's own tokens are left in the cache: its prompt and one generated token.
    assert running.attention_mask.shape[1] == len(ids(gen, "hi")) + 1
    assert bool(running.attention_mask.all())
    assert running.cache.get_seq_length() == running.attention_mask.shape[1]


def test_dropped_rows_leave_the_others_untouched(gen):
    keep = request(gen, "hello there", RowSteering(gen.adapter), max_new_tokens=8)
    running = gen.batch()
    first = [e.token_id for _, e in running.add([keep], owners=["keep"])]
    running.add([request(gen, "goodbye", max_new_tokens=8), request(gen, "again", max_new_tokens=8)],
                owners=["gone", "gone"])
    assert running.drop("gone") == 2 and len(running) == 1
    rest = [e.token_id for _ in range(7) for _, e in running.step()]
    assert not running and first + rest == gen.generate([keep])[0].token_ids


def _default_tokenizer():
    from transformers import AutoTokenizer

    from fsrl.models import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model(progress=False))


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_incremental_detokenizer_gives_the_whole_decode_a_window_at_a_time(which):
    """Over real text (accents, CJK, emoji: characters split across byte-level tokens) and
    random token ids, the text handed out so far is always a prefix of decoding every token,
    and all of it whenever that decode ends on a whole character."""
    from fsrl.testing import tiny_tokenizer
    from fsrl.generation import IncrementalDetokenizer

    tokenizer = tiny_tokenizer() if which == "tiny" else _default_tokenizer()
    text = "Déjà vu: 東京 is big 🌋🌋! Line two,\n\n  spaced   out. Ünïcödé ✓ done."
    g = torch.Generator().manual_seed(0)
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"]]
    sequences += [torch.randint(0, len(tokenizer), (60,), generator=g).tolist() for _ in range(20)]
    for ids in sequences:
        detok, handed = IncrementalDetokenizer(tokenizer), ""
        for n in range(1, len(ids) + 1):
            handed += detok.step(ids[:n])
            full = tokenizer.decode(ids[:n], skip_special_tokens=True)
            assert full.startswith(handed)
            if not full.endswith("\ufffd"):
                assert handed == full
