"""The demo data's judging rules and pair builder (pure text; no model)."""

import json

import pytest

from fsrl.demo.build_data import is_naming_request, make_list_pairs, make_pairs, repeat_first_item, seed_for
from fsrl.prompts import HELDOUT_TOPICS, TRAIN_TOPICS, demo_prompts
from fsrl.demo.rules import (complete, distinct_items, has_list, judge_bullets, judge_concise,
                              list_items)

RAMBLING = "Saving money is a crucial aspect of personal finance, and there is no substitute for"
SHORT = "Save a fixed share of every paycheck."
LONG_COMPLETE = "Save money. " * 8


def test_concise_prefers_a_complete_short_answer():
    assert complete(SHORT) and not complete(RAMBLING) and not complete("Yes.")
    assert judge_concise(SHORT, RAMBLING) == 1 and judge_concise(RAMBLING, SHORT) == -1
    assert judge_concise(SHORT, LONG_COMPLETE) == 1            # 7 words <= 3/4 of 16
    assert judge_concise(SHORT, SHORT + " Yes.") == 0          # 7 vs 8 words: no preference
    assert judge_concise(RAMBLING, RAMBLING + " more") == 0    # neither complete


def test_bullets_prefers_a_list_over_prose():
    listed = "Tips:\n- budget\n- save\n1. invest\n2) wait"
    assert list_items(listed) == 4 and has_list(listed)
    assert not has_list("1. one\n2. two") and not has_list("-no space\n-here\n-at all")
    looping = "1. Yoga\n2. Yoga.\n3. yoga\n4. Yoga\n5. Stretch"
    assert list_items(looping) == 5 and distinct_items(looping) == 2 and not has_list(looping)
    assert judge_bullets(listed, RAMBLING) == 1 and judge_bullets(RAMBLING, listed) == -1
    assert judge_bullets(listed, listed) == 0 and judge_bullets(SHORT, RAMBLING) == 0


def test_prompts_split_by_topic():
    prompts = demo_prompts()
    assert not set(TRAIN_TOPICS) & set(HELDOUT_TOPICS)
    assert {p.topic for p in prompts if p.split == "heldout"} == set(HELDOUT_TOPICS)
    assert len({p.id for p in prompts}) == len(prompts)


def test_pairs_keep_only_judged_prompts_and_put_the_preferred_first(tmp_path):
    rows = []
    for pid, split, plain, concise, bullets in [
            ("train-00-0", "train", RAMBLING, SHORT, "- a\n- b\n- c"),
            ("train-00-1", "train", SHORT, SHORT, SHORT),            # no preference either way
            ("heldout-00-0", "heldout", "- x\n- y\n- z", RAMBLING, RAMBLING)]:
        for variant, text in (("plain", plain), ("concise", concise), ("bullets", bullets)):
            rows.append({"prompt_id": pid, "split": split, "topic": "t", "prompt": "p?",
                         "variant": variant, "text": text})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = make_pairs(tmp_path / "r.jsonl", tmp_path)
    assert counts["concise"]["train"] == 1 and counts["concise"]["heldout"] == 0
    concise = json.loads((tmp_path / "concise" / "train.jsonl").read_text())
    assert concise["chosen"] == SHORT and concise["chosen_variant"] == "concise"
    bullets = [json.loads(line) for line in (tmp_path / "bullets" / "heldout.jsonl").read_text().splitlines()]
    assert bullets[0]["chosen_variant"] == "plain" and bullets[0]["rejected"] == RAMBLING


def test_the_evaluation_set_is_frozen_and_shares_no_topic_or_template_with_the_demo_data():
    from fsrl.prompts import EVAL_SET_SHA256_16, EVAL_TEMPLATES, TEMPLATES, eval_prompts, eval_set_digest

    prompts = eval_prompts()
    assert eval_set_digest() == EVAL_SET_SHA256_16 and len(prompts) == 64
    assert not {p.topic for p in prompts} & (set(TRAIN_TOPICS) | set(HELDOUT_TOPICS))
    assert not set(EVAL_TEMPLATES) & set(TEMPLATES)


def test_the_list_evaluation_set_is_frozen_and_apart_from_bullets_training_and_selection():
    from fsrl.demo.examples import EXAMPLES
    from fsrl.prompts import (LIST_EVAL_SET_SHA256_16, LIST_EVAL_TEMPLATES, SPENT_LIST3_TEMPLATES, SPENT_LIST4_TEMPLATES,
                              SPENT_LIST5_TEMPLATES, SPENT_LIST_TEMPLATES, TEMPLATES, list_eval_prompts,
                              list_selection_prompts, list_train_prompts, prompts_digest, spent_list_sets)

    prompts = list_eval_prompts()
    assert prompts_digest(prompts) == LIST_EVAL_SET_SHA256_16 and len(prompts) == 72
    seen = list_train_prompts() + list_selection_prompts() + spent_list_sets()
    assert not {p.text for p in prompts} & ({p.text for p in seen} | set(EXAMPLES["bullets"]))
    assert not {p.topic for p in prompts} & {p.topic for p in seen}
    assert not {p.id for p in prompts} & {p.id for p in seen}
    assert not set(LIST_EVAL_TEMPLATES) & (set(TEMPLATES) | set(SPENT_LIST_TEMPLATES) | set(SPENT_LIST3_TEMPLATES)
                                          | set(SPENT_LIST4_TEMPLATES) | set(SPENT_LIST5_TEMPLATES))


def test_list_pairs_choose_the_first_finished_on_topic_list_against_the_plain_answer_and_a_botched_list(tmp_path):
    def row(variant, text, finished=True, pid="train-r00"):
        return {"prompt_id": pid, "topic": "camping", "split": "train", "prompt": "What should I pack for camping?",
                "variant": variant, "text": text, "finished": finished}

    botched = "1. A tent\n2. A tent\n3. A tent\n4. A tent"
    cut = "1. A camping tent\n2. A sleeping bag\n3. A"                          # a list, but cut by the budget
    good = "For camping:\n- a tent\n- a sleeping bag\n- a torch"
    lists = tmp_path / "lists.jsonl"
    lists.write_text("".join(json.dumps(r) + "\n" for r in [
        row("bullets-greedy", cut, finished=False), row("bullets-s0", botched), row("bullets-s1", good),
        row("plain-greedy", "Camping is fun. Bring what you need.", finished=False),
        row("bullets-greedy", botched, pid="train-r01"), row("plain-greedy", "No list.", pid="train-r01")]))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("")
    assert make_list_pairs(lists, responses, tmp_path) == {"train": 4, "heldout": 0}
    pairs = [json.loads(line) for line in (tmp_path / "bullets" / "train.jsonl").read_text().splitlines()]
    short = 1 + seed_for("train-r00", "cut") % 2                          # the good list stopped after 1 or 2 items
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (good, "Camping is fun. Bring what you need."), (good, botched),
        (good, ["For camping:\n- a tent", "For camping:\n- a tent\n- a sleeping bag"][short - 1]),
        (good, "For camping:\n- a tent\n- a tent\n- a tent")]
    assert [p["rejected_variant"] for p in pairs[2:]] == [f"bullets-s1-cut{short}", "bullets-s1-repeat"]
    # (train-r01 has no good list: no pair)
    assert pairs[0]["prompt"] == "What should I pack for camping?"        # the hint is never shown


def test_a_naming_request_chooses_its_hand_written_names_and_rejects_the_models_lists_that_say_the_subject(tmp_path):
    prompt = "Suggest some names for a pet rabbit."

    def row(variant, text):
        return {"prompt_id": "train-r02", "topic": "rabbit", "split": "train", "prompt": prompt,
                "variant": variant, "text": text, "finished": True}

    with_subject = "1. Max\n2. Luna\n3. Rabbit"                     # a list, but one item is the subject
    lists = tmp_path / "lists.jsonl"
    lists.write_text("".join(json.dumps(r) + "\n" for r in [
        row("bullets-greedy", with_subject), row("bullets-s0", "1. Clover\n2. Thumper\n3. Hazel"),
        row("plain-greedy", "Rabbits are nice.")]))
    (tmp_path / "responses.jsonl").write_text("")
    assert is_naming_request("What should I name my new goldfish?") and is_naming_request("Give me some name ideas for a pig.")
    assert not is_naming_request("How do I get better at remembering names?")
    assert make_list_pairs(lists, tmp_path / "responses.jsonl", tmp_path) == {"train": 5, "heldout": 0}
    pairs = [json.loads(line) for line in (tmp_path / "bullets" / "train.jsonl").read_text().splitlines()]
    names = "1. Thumper\n2. Clover\n3. Hazel\n4. Bun Bun\n5. Cinnamon"   # NAME_LISTS', not the model's
    assert {(p["chosen"], p["chosen_variant"]) for p in pairs} == {(names, "names")}
    short = 1 + seed_for("train-r02", "cut") % 2
    assert [p["rejected"] for p in pairs] == [
        "Rabbits are nice.", with_subject, "\n".join(names.splitlines()[:short]),
        "1. Thumper\n2. Thumper\n3. Thumper\n4. Thumper\n5. Thumper",
        "1. Rabbit\n2. Rabbit\n3. Rabbit\n4. Rabbit\n5. Rabbit"]
    assert pairs[-1]["rejected_variant"] == "names-subject"


def test_every_naming_request_of_training_and_selection_has_hand_written_names_that_do_not_say_its_subject():
    from fsrl.demo.rules import naming_list
    from fsrl.prompts import NAME_LISTS, list_selection_prompts, list_train_prompts, name_list_answer

    naming = [p for p in list_train_prompts() + list_selection_prompts() if is_naming_request(p.text)]
    assert len(naming) == 62 and {p.text for p in naming} == set(NAME_LISTS)
    for p in naming:
        assert naming_list(name_list_answer(p.text), p.topic), p.text


def test_a_repeated_list_names_its_first_item_at_every_marker_and_is_no_list():
    from fsrl.demo.rules import has_list

    text = "Ideas:\n1. Bubbles\n2. Finn\n3. Goldie\nEnjoy!"
    assert repeat_first_item(text) == "Ideas:\n1. Bubbles\n2. Bubbles\n3. Bubbles\nEnjoy!"
    assert has_list(text) and not has_list(repeat_first_item(text))


def test_each_rule_is_judged_on_its_own_frozen_set_and_a_changed_set_is_refused(monkeypatch):
    from fsrl import prompts
    from fsrl.errors import FsrlError

    assert prompts.frozen_eval_set("bullets") == (prompts.list_eval_prompts(), prompts.LIST_EVAL_SET_SHA256_16)
    assert prompts.frozen_eval_set("concise") == (prompts.eval_prompts(), prompts.EVAL_SET_SHA256_16)
    monkeypatch.setattr(prompts, "LIST_EVAL_TOPICS", prompts.LIST_EVAL_TOPICS[:-1])
    with pytest.raises(FsrlError, match="freeze it anew"):
        prompts.frozen_eval_set("bullets")


def test_concise_eval_rule_needs_a_finished_on_topic_answer():
    from fsrl.demo.rules import Answer, judge_concise_eval

    short = Answer("Glaciers are slow rivers of ice that carve valleys.", True, "glaciers")
    long = Answer("Glaciers are huge masses of ice. " * 4, True, "glaciers")
    assert judge_concise_eval(short, long) == 1 and judge_concise_eval(long, short) == -1
    off_topic = Answer("Cats sleep for most of the day.", True, "glaciers")
    assert judge_concise_eval(off_topic, long) == -1                 # short but not about glaciers
    cut = Answer(short.text, False, "glaciers")
    assert judge_concise_eval(cut, long) == -1                       # ran past the budget
    assert judge_concise_eval(short, Answer(short.text + " Yes.", True, "glaciers")) == 0


def test_bullets_eval_rule_needs_an_on_topic_list():
    from fsrl.demo.rules import Answer, judge_bullets_eval

    listed = "Octopus facts:\n- eight arms\n- three hearts\n- blue blood"
    assert judge_bullets_eval(Answer(listed, False, "octopuses"), Answer("Octopuses are smart.", True, "octopuses")) == 1
    assert judge_bullets_eval(Answer(listed, True, "glaciers"), Answer("Ice.", True, "glaciers")) == 0


def test_bullets_eval_rule_reads_a_naming_requests_list_as_names_that_need_not_say_the_subject():
    from fsrl.demo.rules import Answer, judge_bullets_eval

    names, with_subject = "1. Luna\n2. Fiona\n3. Max", "1. Guinea pig\n2. Fiona\n3. Max"
    assert judge_bullets_eval(Answer(names, True, "guinea pig", naming=True), Answer("Pick a name.", True, "guinea pig", naming=True)) == 1
    assert judge_bullets_eval(Answer(names, True, "guinea pig", naming=True),
                              Answer(with_subject, True, "guinea pig", naming=True)) == 1
    assert judge_bullets_eval(Answer(names, True, "guinea pig"), Answer(with_subject, True, "guinea pig")) == -1


def test_wilson_interval_and_repeated_ngrams():
    from fsrl.demo.evaluate import repeated_ngram_share, wilson_interval

    # p = 0.5, n = 64, z = 1.96: centre 0.5, half-width 1.96 sqrt(1/256 + z^2/16384) / (1 + z^2/64) = 0.1190
    low, high = wilson_interval(32, 64)
    assert abs(low - 0.3810) < 1e-4 and abs(high - 0.6190) < 1e-4
    assert wilson_interval(0, 10)[0] == 0.0 and abs(wilson_interval(10, 10)[1] - 1.0) < 1e-12
    assert abs(repeated_ngram_share("a b c d a b c d") - 0.2) < 1e-12  # 5 four-grams, "a b c d" twice
    assert repeated_ngram_share("one two three four five") == 0.0


def test_coherence_counts_lists_and_on_topic_lists_apart():
    from fsrl.demo.evaluate import coherence
    from fsrl.demo.rules import Answer

    answers = [Answer("Octopus facts:\n- eight arms\n- three hearts\n- blue blood", True, "octopuses"),
               Answer("- a tent\n- a stove\n- a map", True, "glaciers"),        # a list, but not on the topic
               Answer("1. Octopuses\n2. Octopuses", True, "octopuses"),        # two items: no list
               Answer("", True, "octopuses")]
    c = coherence(answers, [None] * 4)
    assert (c["any_list_share"], c["list_share"], c["empty_answers"]) == (0.5, 0.25, 1)
