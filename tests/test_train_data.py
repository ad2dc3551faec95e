"""Preference data: layouts, chat template, masking of the prompt, truncation, clear errors."""

import json

import pytest

from fsrl.testing import tiny_tokenizer
from fsrl.cli import main
from fsrl.train.data import (DataError, PreferenceDataset, TokenizedPair, collate, load_pairs,
                             parse_pair, tokenize_pair, truncate)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [{"prompt": "hi", "chosen": "ok", "rejected": "no way"},
        {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "yo"}],
         "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "meh"}]


def test_response_tokens_are_the_only_scored_tokens(tok):
    pair = parse_pair(ROWS[0], "x:1")
    t = tokenize_pair(pair, tok, max_length=256)
    assert tok.decode(t.prompt_ids) == "user: hi\nassistant: "
    assert tok.decode(t.chosen_ids) == "ok\n" and tok.decode(t.rejected_ids) == "no way\n"
    batch = collate([t], pad_id=tok.pad_token_id)
    chosen, rejected = batch.input_ids
    assert tok.decode(chosen[batch.response_mask[0]]) == "ok\n"
    assert tok.decode(rejected[batch.response_mask[1]]) == "no way\n"
    # right padding: positions -1 and attention 0 past each row's end
    n = len(t.prompt_ids) + len(t.chosen_ids)
    assert batch.positions[0, n:].eq(-1).all() and batch.attention_mask[0, n:].eq(0).all()
    assert batch.positions[1].tolist() == list(range(batch.input_ids.shape[1]))


def test_chat_messages_and_system_prompts_render_through_the_template(tok):
    t = tokenize_pair(parse_pair(ROWS[1], "x:2"), tok, max_length=256)
    assert tok.decode(t.prompt_ids) == "system: be nice\nuser: yo\nassistant: "
    assert tok.decode(t.chosen_ids) == "hello\n"


def test_ultrafeedback_layout_scores_only_the_assistant_turn(tok):
    row = {"prompt": "why?", "chosen": [{"role": "user", "content": "why?"},
                                          {"role": "assistant", "content": "because"}],
           "rejected": [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "no"}],
           "score_chosen": 9.0}
    t = tokenize_pair(parse_pair(row, "x:1"), tok, max_length=256)
    assert tok.decode(t.prompt_ids) == "user: why?\nassistant: "
    assert tok.decode(t.chosen_ids) == "because\n" and tok.decode(t.rejected_ids) == "no\n"


def test_truncation_keeps_the_response_and_the_end_of_the_prompt(tok):
    row = {"prompt": "x" * 100, "chosen": "short", "rejected": "a longer answer"}
    t = tokenize_pair(parse_pair(row, "x:1"), tok, max_length=40)
    assert t.truncated
    assert tok.decode(t.chosen_ids) == "short\n" and tok.decode(t.rejected_ids) == "a longer answer\n"
    assert len(t.prompt_ids) + len(t.rejected_ids) == 40
    assert tok.decode(t.prompt_ids).endswith("x\nassistant: ")


def test_truncation_cuts_an_overlong_response_at_its_end_keeping_some_prompt():
    pair = TokenizedPair(prompt_ids=list(range(30)), chosen_ids=list(range(100, 200)),
                         rejected_ids=[7, 8])
    t = truncate(pair, max_length=64)
    assert t.prompt_ids == list(range(14, 30))                 # MIN_PROMPT_TOKENS = 16
    assert t.chosen_ids == list(range(100, 148)) and t.rejected_ids == [7, 8]
    short = TokenizedPair([1, 2], [3], [4])
    assert truncate(short, 64) is short


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "chosen": "b"}', "x.jsonl:3: missing field(s) rejected"),
    ('{"prompt": "a", "chosen": "b", "rejected": 5}', "x.jsonl:3: rejected must be a string"),
    ('{"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}', "x.jsonl:3: chosen[0] is not a chat message"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "x.jsonl:3: chosen is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "x.jsonl:3: not valid JSON"),
    ('["a", "b", "c"]', "x.jsonl:3: expected a JSON object"),
])
def test_malformed_row_error_names_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "x.jsonl", [ROWS[0], ROWS[0], line])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_bad_data_as_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], '{"prompt": "a", "chosen": "b"}'])
    code = main(["train", "--data", str(path), "--out", str(tmp_path / "a"), "--model",
                 str(tmp_path / "nowhere"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "bad.jsonl:2: missing field(s) rejected" in err


def test_parquet_and_datasets_folder_read_like_jsonl(tmp_path, tok):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "p%d" % i, "chosen": "c", "rejected": "r"} for i in range(3)]
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "folder"))
    ds.save_to_disk(str(tmp_path / "single"))
    for path in ("d.parquet", "folder", "single"):
        pairs = load_pairs(tmp_path / path)
        assert [p.prompt[0]["content"] for p in pairs] == ["p0", "p1", "p2"]
    bad = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": None}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet row 1: missing field\(s\) rejected"):
        load_pairs(tmp_path / "bad.parquet")


def test_dataset_order_is_seeded_per_epoch(tok):
    pairs = [parse_pair({"prompt": str(i), "chosen": "a", "rejected": "b"}, f"x:{i}") for i in range(10)]
    ds = PreferenceDataset(pairs, tok, max_length=64)
    assert ds.order(0, 1) == ds.order(0, 1) != ds.order(1, 1)
    assert sorted(ds.order(0, 1)) == list(range(10))
