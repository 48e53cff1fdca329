"""``synth review``: the judge's verdicts (Table 2's labels, section 4.4's errors) through a loopback
OpenAI-compatible server with known replies; malformed replies recorded and asked again; resume; the kept labels;
agreement with people's labels; the summary in ``synth stats``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth.review.judge import Verdict, cohen_kappa, parse_verdict, render_dialogue, verdict_schema
from synth.testing import ChatServer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "configs" / "synth" / "sample.yaml"


@pytest.mark.parametrize("reply, verdict", [
    ('{"quality": "Excellent", "characteristics": ["Image Comparison"], "errors": [], "reason": "Rich."}',
     Verdict("Excellent", ["Image Comparison"], [], "Rich.")),
    ('```json\n{"quality": "poor", "characteristics": "image creation", "errors": ["hallucination", '
     '"Incoherence", "Hallucination"]}\n```',
     Verdict("Poor", ["Image Creation"], ["Incoherence", "Hallucination"], "")),
    ('Here it is: {"quality": " Satisfactory ", "characteristics": [], "errors": []} Hope that helps {x}',
     Verdict("Satisfactory", [], [], "")),
])
def test_a_verdict_is_read_leniently_where_the_meaning_is_clear(reply: str, verdict: Verdict) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply, why", [
    ("", "an empty reply"),
    ("The conversation is very interesting, practical, or intricate.", "no JSON object"),
    ('{"quality": "Great", "characteristics": []}', "quality 'Great' is not one of"),
    ('{"quality": "Poor", "characteristics": ["Image Drawing"]}', "characteristics ['Image Drawing'] not among"),
    ('{"quality": "Poor", "errors": {"x": 1}}', "errors is not a list"),
    ('{"quality": "Excellent", "characteristics": ["image-caption", "image-des', "no JSON object"),
    ('["Excellent"]', "no JSON object"),
])
def test_a_reply_that_is_no_verdict_says_why(reply: str, why: str) -> None:
    result = parse_verdict(reply)
    assert isinstance(result, str) and why in result


def test_cohen_kappa_by_hand() -> None:
    pairs = [("Excellent", "Excellent"), ("Satisfactory", "Satisfactory"), ("Poor", "Satisfactory"), ("Poor", "Poor")]
    # observed 3/4; chance (1*1 + 1*2 + 2*1) / 16 = 5/16
    assert cohen_kappa(pairs, ["Excellent", "Satisfactory", "Poor"]) == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
    assert cohen_kappa([("Poor", "Poor")] * 3, ["Excellent", "Satisfactory", "Poor"]) is None  # undefined
    assert cohen_kappa([("Poor", "Excellent"), ("Excellent", "Poor")], ["Excellent", "Poor"]) == pytest.approx(-1.0)


def test_the_judge_reads_the_conversation_in_appendix_a_notation() -> None:
    from synth.data.schema import Conversation, Turn

    conversation = Conversation("c", [Turn("user", "Look <image> and <image>", ["a.png", "b.png"], ["a bus", "a cat"]),
                                      Turn("assistant", "Here: <image>", ["c.png"], ["a dog"])])
    images, dialogue = render_dialogue(conversation)
    assert images == "<img0> a bus </img0>\n<img1> a cat </img1>\n<img2> a dog </img2>"
    assert dialogue == "Human: Look <img0> a bus </img0> and <img1> a cat </img1>\n\nAssistant: Here: <img2> a dog </img2>"


@pytest.fixture(scope="module")
def filtered(tmp_path_factory) -> Path:
    """The offline pipeline's 12 kept conversations (the sample config), with people's labels for three."""
    from synth.config import load_config
    from synth.pipeline import run_all

    work = tmp_path_factory.mktemp("reviewed")
    run_all(load_config(SAMPLE, [f"work_dir={work}"]), log=lambda line: None)
    kept = [json.loads(line) for line in (work / "filter" / "conversations.jsonl").read_text().splitlines()]
    labels = ["Excellent", "Poor", "Satisfactory"]
    (work / "annotate").mkdir()
    (work / "annotate" / "annotations.jsonl").write_text("".join(
        json.dumps({"id": record["meta"]["group_id"], "captions": [], "dialogue": "", "quality": label,
                    "characteristics": ["Image Comparison"], "source": "test"}) + "\n"
        for record, label in zip(kept, labels)))
    return work


def copy_of(work: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(work, target)
    return target


def verdict_for(number: int) -> str:
    quality = ["Excellent", "Satisfactory", "Poor"][number % 3]
    errors = ["Hallucination"] if quality == "Poor" else []
    return json.dumps({"quality": quality, "characteristics": ["Image Comparison", "Image Creation"][: 1 + number % 2],
                       "errors": errors, "reason": "r"})


def test_review_records_bad_replies_resumes_keeps_labels_and_reports(filtered: Path, tmp_path: Path) -> None:
    from synth.cli import run_review_command, run_stages

    work = copy_of(filtered, tmp_path / "w")
    overrides = [f"work_dir={work}", "review.backend=openai", "review.model=judge", "review.api_key_env=NO_KEY",
                 "review.concurrency=1", "review.keep=[Excellent,Satisfactory]"]
    replies = {0: "I cannot judge this.", 1: '{"quality": "Good"}'}
    with ChatServer(plan=lambda n, body: "500" if n == 2 else "ok",
                    reply=lambda n, body: replies.get(n, verdict_for(n))) as server:
        assert run_review_command(SAMPLE, [f"review.base_url={server.url}", "review.max_attempts=1", *overrides]) == 0
        asked_first = len(server.requests)
        summary = json.loads((work / "review" / "summary.json").read_text())
        assert summary["conversations"] == 12 and summary["unreadable"] == 2 and summary["judged"] == 9
        assert summary["pending"] == 1  # the request answered 500, out of attempts: in failures.jsonl
        failures = (work / "review" / "failures.jsonl").read_text().splitlines()
        assert len(failures) == 1 and "HTTP 500" in json.loads(failures[0])["error"]
        lines = [json.loads(line) for line in (work / "review" / "reviews.jsonl").read_text().splitlines()]
        assert [line["error"] for line in lines[:2]] == [
            "unreadable verdict: no JSON object in the reply", "unreadable verdict: quality 'Good' is not one of "
                                                               "Excellent, Satisfactory, Poor"]
        assert lines[0]["reply"] == "I cannot judge this."
        # a rerun asks only what has no verdict: the two unreadable ones and the failed one
        assert run_review_command(SAMPLE, [f"review.base_url={server.url}", *overrides]) == 0
        assert len(server.requests) - asked_first == 3
    summary = json.loads((work / "review" / "summary.json").read_text())
    assert summary["judged"] == 12 and summary["unreadable"] == 0 and summary["pending"] == 0
    counts = {label: row["count"] for label, row in summary["quality"].items()}
    assert sum(counts.values()) == 12 and counts["Poor"] >= 1
    assert summary["errors_in_poor"]["Hallucination"]["count"] == counts["Poor"]
    agreement = summary["agreement_with_people"]
    assert agreement["conversations"] == 3 and sum(map(sum, (r.values() for r in agreement[
        "confusion_rows_person_columns_judge"].values()))) == 3
    kept = [json.loads(line) for line in (work / "review" / "conversations.jsonl").read_text().splitlines()]
    assert len(kept) == counts["Excellent"] + counts["Satisfactory"]
    assert all(k["meta"]["review"]["quality"] in ("Excellent", "Satisfactory") for k in kept)
    assert all((work / "review" / "images" / name).is_file()
               for k in kept for turn in k["conversation"] for name in turn["image_list"])
    # synth stats reports the judge's labels beside Table 3
    assert run_stages("stats", SAMPLE, [f"work_dir={work}"], True, None) == 0
    stats = json.loads((work / "stats" / "stats.json").read_text())
    assert stats["review"]["judged"] == 12 and (work / "stats" / "quality.png").is_file()
    assert "Quality (Figure 3a)" in (work / "stats" / "table.txt").read_text()


def test_structured_review_sends_the_verdict_schema(filtered: Path, tmp_path: Path) -> None:
    from synth.cli import run_review_command

    work = copy_of(filtered, tmp_path / "w")
    with ChatServer(reply=lambda n, body: verdict_for(n)) as server:
        assert run_review_command(SAMPLE, [f"work_dir={work}", "review.backend=openai", "review.model=judge",
                                           f"review.base_url={server.url}", "review.api_key_env=NO_KEY",
                                           "review.structured=true"]) == 0
    formats = [request["response_format"] for request in server.requests]
    assert len(formats) == 12 and all(f["json_schema"]["schema"] == verdict_schema() for f in formats)
    assert all(f["json_schema"]["strict"] for f in formats)
    assert server.requests[0]["temperature"] == 0.0  # a judge: the same verdict on a rerun


@pytest.mark.parametrize("overrides, message", [
    (["review.keep=[Great]"], "review.keep ['Great'] are not quality labels"),
    (["review.backend=offline"], "there is no offline judge"),
])
def test_review_refuses_bad_settings(filtered: Path, tmp_path: Path, capsys, overrides, message: str) -> None:
    from synth.cli import run_review_command

    work = copy_of(filtered, tmp_path / "w")
    assert run_review_command(SAMPLE, [f"work_dir={work}", *overrides]) == 1
    assert message in capsys.readouterr().err
    assert not (work / "review").exists()  # refused before anything was asked or written


def test_review_needs_the_filters_conversations_and_a_rubric_with_the_dialogue(tmp_path: Path, capsys) -> None:
    from synth.cli import run_review_command

    assert run_review_command(SAMPLE, [f"work_dir={tmp_path / 'w'}"]) == 1
    assert "run `synth filter`" in capsys.readouterr().err
    (tmp_path / "w" / "filter").mkdir(parents=True)
    (tmp_path / "w" / "filter" / "conversations.jsonl").write_text("")
    (tmp_path / "rubric.txt").write_text("Judge it.")
    assert run_review_command(SAMPLE, [f"work_dir={tmp_path / 'w'}", f"review.rubric={tmp_path / 'rubric.txt'}"]) == 1
    assert "must contain {dialogue}" in capsys.readouterr().err
