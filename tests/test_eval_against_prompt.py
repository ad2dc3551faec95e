"""`fsrl eval`: a demo adapter against its prompt baseline, with an LLM judge on an
OpenAI-compatible endpoint (a stub here: the judge's wiring is tested, its quality is not)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi import FastAPI, Request

from _server_fixtures import ServedClient
from fsrl.demo.against_prompt import head_to_head, llm_judge

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def stub_judge_app(answer: str, seen: list[dict], fail_first: int = 0) -> FastAPI:
    """Chat completions that always answer `answer` (after `fail_first` 500s)."""
    app = FastAPI()
    failures = [fail_first]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        if failures[0] > 0:
            failures[0] -= 1
            from fastapi.responses import JSONResponse
            return JSONResponse({"error": {"message": "busy"}}, status_code=500)
        return {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}]}
    return app


def test_the_judge_reads_the_letter_in_the_order_it_showed_the_answers():
    seen: list[dict] = []
    with ServedClient(stub_judge_app("A", seen)) as stub:
        judge = llm_judge(f"{stub.base_url}/v1", "stub", "a short answer")
        assert judge("Q?", "steered", "base", steered_first=True) == 1
        assert judge("Q?", "steered", "base", steered_first=False) == -1
    prompt = seen[0]["messages"][0]["content"]
    assert "a short answer" in prompt and prompt.index("steered") < prompt.index("base")
    assert seen[0]["model"] == "stub" and seen[0]["temperature"] == 0


def test_the_judge_retries_a_failing_endpoint_and_gives_no_verdict_for_a_non_answer():
    seen: list[dict] = []
    with ServedClient(stub_judge_app("A", seen, fail_first=2)) as stub:
        assert llm_judge(f"{stub.base_url}/v1", "stub", "c")("Q?", "s", "b", True) == 1
    assert len(seen) == 3  # two 500s, retried with backoff
    with ServedClient(stub_judge_app("maybe", [])) as stub:
        assert llm_judge(f"{stub.base_url}/v1", "stub", "c")("Q?", "s", "b", True) is None


def test_head_to_head_counts_each_prompt_by_its_two_verdicts_and_sign_tests_the_split():
    outcomes = {"adapter x1": ["win"] * 9 + ["tie", "loss", "win"], "prompt": ["tie"] * 9 + ["win", "loss", "win"]}
    report = {"generations": [{"arm": arm, "prompt": f"q{i}", "outcome": o}
                              for arm, said in outcomes.items() for i, o in enumerate(said)]}
    # better on q0-q8, worse on q9, the same on q10 and q11: P(9 or more of 10, or 1 or fewer) = 22/1024
    assert head_to_head(report, "adapter x1") == {"better": 9, "worse": 1, "same": 2, "p": round(22 / 1024, 4)}
    assert head_to_head(report, "prompt", "adapter x1")["better"] == 1


@pytest.mark.slow
def test_fsrl_eval_runs_every_arm_against_base_and_writes_the_table(tmp_path):
    """Two prompts, 8 tokens (a look at the wiring, not a figure): every arm judged against base
    by the rule and by the stub judge, the table written."""
    from fsrl.cli import main

    with ServedClient(stub_judge_app("B", [])) as stub:
        code = main(["eval", "--adapter", str(REPO / "adapters" / "concise"), "--rule", "concise",
                     "--train", str(REPO / "data" / "demo" / "concise" / "heldout.jsonl"), "--limit", "2", "--pairs", "6",
                     "--max-new-tokens", "8", "--out", str(tmp_path), "--judge-url", f"{stub.base_url}/v1",
                     "--judge-model", "stub"])
    assert code == 0
    report = json.loads((tmp_path / "against_prompt.json").read_text())
    assert list(report["arms"]) == ["base", "prompt", "adapter x1", "adapter x0.5", "adapter x2", "contrast"]
    assert report["instruction"] == "Answer in one or two sentences." and report["prompts"] == 2
    for name, arm in report["arms"].items():
        if name != "base":
            assert arm["wins"] + arm["ties"] + arm["losses"] == 2 and arm["judge"]["verdicts"] == 2
    assert len(report["contrast"]["features"]) == 16
    prompted = [r for r in report["generations"] if r["arm"] == "prompt"]
    assert len(prompted) == 2 and all(r["answer"] != "" for r in prompted)
    table = (tmp_path / "against_prompt.md").read_text()
    assert table.count("\n") == 8 and "`contrast`" in table and "LLM judge" in table
