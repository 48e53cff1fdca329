"""The interleaved-generation benchmarks: OpenING and ISG-Bench read in their published layouts, MIM's answers
written where each benchmark's own scorer reads them, and the scoring each defines, the deterministic parts
against hand-computed cases and the judged parts against a loopback judge whose replies are known."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from mim.evaluation.interleaved import isg, opening
from mim.evaluation.interleaved.judge import Judge
from mim.evaluation.interleaved.runner import run_isg, run_opening
from mim.inference.interleaved import GenerationResult, ImagePart, TextPart
from synth.testing import ChatServer


def save_png(path: Path, colour: tuple[int, int, int], size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def make_opening(root: Path) -> Path:
    """An OpenING-benchmark folder as published: test_data.jsonl, images under images/<subtask>/."""
    bench = root / "OpenING-benchmark"
    save_png(bench / "images" / "Storybook Completion" / "1-i-1.jpg", (200, 40, 40))
    save_png(bench / "images" / "Storybook Completion" / "1-o-1.jpg", (40, 200, 40))
    save_png(bench / "images" / "Storybook Completion" / "2-o-1.jpg", (40, 40, 200))
    meta = {"meta_task_id": "3", "meta_task_name": "Multimodal Content Completion", "subtask_id": "1",
            "subtask_name": "Storybook Completion"}
    lines = [
        {"total_uid": "0301001", **meta, "data_id": "1", "conversations": [
            {"input": [{"image": "./images/Storybook Completion/1-i-1.jpg",
                        "text": "Complete the story. <BEGIN> A fox in the snow. <image>"},
                       {"image": None, "text": "Then what happens?"}]},
            {"output": [{"image": "./images/Storybook Completion/1-o-1.jpg", "text": "The fox finds a den. <image>"}]}]},
        {"total_uid": "0301002", **meta, "data_id": "2", "conversations": [
            {"input": [{"image": None, "text": "<BEGIN> Draw a kite for me."}]},
            {"output": [{"image": "./images/Storybook Completion/2-o-1.jpg", "text": "Here is a kite."}]}]},
        {"total_uid": "0301003", **meta, "data_id": "3", "conversations": [
            {"input": [{"image": "../../secret.jpg", "text": "<BEGIN> Look."}]}, {"output": []}]},
    ]
    path = bench / "test_data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    return path


def picture(colour: tuple[int, int, int], size: int = 24) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def reply_with(*parts) -> GenerationResult:
    return GenerationResult([TextPart(p) if isinstance(p, str) else ImagePart(p, "a drawing", "prompt") for p in parts])


def decoded(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    return Image.open(io.BytesIO(base64.b64decode(data)))


# --- OpenING -------------------------------------------------------------------------------------------

def test_opening_reads_the_published_layout_and_rejects_bad_lines_alone(tmp_path: Path) -> None:
    instances, rejected = opening.load_opening(make_opening(tmp_path))
    assert [i.uid for i in instances] == ["0301001", "0301002"]
    assert len(rejected) == 2
    assert ":3:" in rejected[0] and "leaves the benchmark folder" in rejected[0]
    assert ":4:" in rejected[1] and "JSONDecodeError" in rejected[1]
    first = instances[0]
    assert first.inputs[0].image.name == "1-i-1.jpg" and first.inputs[1].image is None
    assert first.reference[0].image.name == "1-o-1.jpg"
    text, images = opening.instance_message(first)
    assert text == "Complete the story.  A fox in the snow. <image>\nThen what happens?"
    assert [p.name for p in images] == ["1-i-1.jpg"]


def test_opening_answers_are_written_as_the_benchmark_publishes_model_outputs(tmp_path: Path) -> None:
    instances, _ = opening.load_opening(make_opening(tmp_path))
    out = tmp_path / "gen_outputs" / "MIM_output"
    result = reply_with("The fox digs.", picture((1, 2, 3)), "It sleeps.", picture((4, 5, 6)), " The end.")
    path = opening.write_opening_answer(instances[0], result, out)
    assert path == out / "0301001.json"
    record = json.loads(path.read_text())
    assert "total_uid" not in record and record["subtask_name"] == "Storybook Completion"
    assert record["conversations"][0]["input"] == instances[0].record["conversations"][0]["input"]
    assert record["conversations"][1]["output"] == [
        {"text": "The fox digs.", "image": "0301001-o-0.jpg"}, {"text": "It sleeps.", "image": "0301001-o-1.jpg"},
        {"text": "The end.", "image": None}]
    assert Image.open(out / "0301001-o-1.jpg").format == "JPEG"
    steps = opening.read_answer(out, "0301001")
    assert [(s.text, s.image.name if s.image else None) for s in steps] == [
        ("The fox digs.", "0301001-o-0.jpg"), ("It sleeps.", "0301001-o-1.jpg"), ("The end.", None)]


def test_opening_judge_message_is_laid_out_as_the_official_judge_script(tmp_path: Path) -> None:
    instances, _ = opening.load_opening(make_opening(tmp_path))
    image_a = tmp_path / "a.png"
    save_png(image_a, (9, 9, 9), size=40)
    content = opening.judge_content(instances[0], [opening.Step("  A's story. ", image_a)], [])
    texts = [part.get("text") for part in content]
    assert texts == ["<INPUT>: Complete the story.  A fox in the snow.  <IMG_0></IMG_0>", None,
                     "Then what happens?", "<OUTPUT_A>: A's story. <IMG_1></IMG_1>", None, "\n<OUTPUT_B>:",
                     "\nPlease only output which model is better: "]
    images = [decoded(part["image_url"]["url"]) for part in content if part["type"] == "image_url"]
    assert [(image.format, image.size) for image in images] == [("JPEG", (512, 512))] * 2
    # an empty first text: "\n<OUTPUT_A>:" on its own, as the script writes it
    content = opening.judge_content(instances[1], [opening.Step("", None), opening.Step("more", None)],
                                    [opening.Step("B says", None)])
    assert [part["text"] for part in content][1:4] == ["\n<OUTPUT_A>:", "more", "\n<OUTPUT_B>: B says"]


@pytest.mark.parametrize("reply, winner", [("A is better", "A"), ("B", "B"), ("Tie(A better)", "Tie(A)"),
                                           ("tie(B better)", "tie(B)"), ("I think model B wins", "Tie(B)"),
                                           ("Output A, clearly", "Tie(A)")])
def test_opening_reads_a_verdict_as_the_official_script(reply: str, winner: str) -> None:
    assert opening.parse_winner(reply, random.Random(0)) == winner


def test_opening_without_a_side_named_leans_at_random(tmp_path: Path) -> None:
    sides = {opening.parse_winner("no idea", random.Random(seed)) for seed in range(20)}
    assert sides == {"Tie(A)", "Tie(B)"}


def test_opening_win_rates_the_four_ways() -> None:
    def battle(a: str, b: str, winner: str) -> dict:
        return {"data_id": "1", "model_A": {"id": "0", "name": a}, "model_B": {"id": "1", "name": b}, "winner": winner}

    results = [battle("MIM", "Human", "A"), battle("Human", "MIM", "A"), battle("MIM", "Human", "Tie(A)"),
               battle("Human", "MIM", "Tie(A)"), battle("MIM", "X", "B")]
    rates = opening.win_rates(results)
    # MIM: 5 played; decisive wins 1 (of 3 decisive); Tie(A) as A=MIM once
    assert rates["without_tie"] == {"Human": 1 / 2, "MIM": 1 / 3, "X": 1.0}
    assert rates["tie_as_loss"] == {"Human": 1 / 4, "MIM": 1 / 5, "X": 1.0}
    assert rates["tie_as_half"] == {"Human": 2 / 4, "MIM": 2 / 5, "X": 1.0}
    assert rates["force_divided_tie"] == {"Human": 2 / 4, "MIM": 2 / 5, "X": 1.0}


def test_opening_battles_put_the_evaluated_model_first_and_keep_the_budget(tmp_path: Path) -> None:
    instances, _ = opening.load_opening(make_opening(tmp_path))
    other = tmp_path / "Other_output"
    other.mkdir()
    (other / "0301001.json").write_text("{}")
    models = {"MIM": tmp_path / "none_yet", "Human": None, "Other": other}
    (tmp_path / "none_yet").mkdir()
    for uid in ("0301001", "0301002"):
        (tmp_path / "none_yet" / f"{uid}.json").write_text("{}")
    battles = opening.sample_battles(instances, models, per_instance=1, seed=3)
    assert len(battles) == 2
    assert all("MIM" in (b["model_A"]["name"], b["model_B"]["name"]) for b in battles)
    everything = opening.sample_battles(instances, models, per_instance=5, seed=3)
    assert len(everything) == 3 + 1  # three pairs where Other answered, one (MIM-Human) where it did not


def _judge(server: ChatServer, **settings) -> Judge:
    return Judge("judge", base_url=server.url, retries=1, **settings)


def test_opening_judging_records_failures_resumes_and_scores(tmp_path: Path) -> None:
    data = make_opening(tmp_path)

    class Responder:
        def respond(self, cases, seeds):
            return [reply_with("My answer.", picture((0, 90, 0))) for _ in cases]

    verdicts = iter(["A is better", "Tie(B better)", "B is better"])
    with ChatServer(plan=lambda n, body: "garbage" if n == 1 else "ok",
                    reply=lambda n, body: next(verdicts)) as server:
        report = run_opening(data, Responder(), tmp_path / "out", _judge(server))
        assert report["answered"] == 2 and report["battles"] == 2 and report["judged"] == 1
        assert server.requests[0]["max_tokens"] == 5
        failures = (tmp_path / "out" / "opening" / "judge_modelAB_results.failures.jsonl").read_text().splitlines()
        assert len(failures) == 1 and "error" in json.loads(failures[0])
        again = run_opening(data, Responder(), tmp_path / "out", _judge(server))
        assert again["answered_now"] == 0 and again["judged"] == 2 and len(server.requests) == 3
    results = json.loads((tmp_path / "out" / "opening" / "judge_modelAB_results.json").read_text())
    assert [r["winner"] for r in results] == ["A", "Tie(B)"]
    assert set(again["win_rates"]["force_divided_tie"]) == {"MIM", "Human"}
    answers = tmp_path / "out" / "opening" / "gen_outputs" / "MIM_output"
    assert sorted(p.name for p in answers.iterdir()) == ["0301001-o-0.jpg", "0301001.json", "0301002-o-0.jpg",
                                                         "0301002.json"]


# --- ISG-Bench -----------------------------------------------------------------------------------------

def make_isg(root: Path) -> Path:
    """An ISG_eval folder as published: ISG-Bench.jsonl, images under images/."""
    save_png(root / "images" / "0000_q1.png", (10, 10, 200))
    for name in ("0000_g1.png", "0000_g2.png", "0001_q1.png"):
        save_png(root / "images" / name, (120, 120, 10))
    lines = [
        {"id": "0000", "Category": "Prediction",
         "Query": [{"type": "text", "content": "Show what happens next: a description, then 2 images."},
                   {"type": "image", "content": "images/0000_q1.png"}],
         "Golden": [{"type": "text", "content": "They dry their hands."},
                    {"type": "image", "content": "images/0000_g1.png"},
                    {"type": "image", "content": "images/0000_g2.png"}],
         "predict": {
             "structure": {"Query": ["<query_text1>", "<query_img1>"], "Answer": ["<gen_text1>", "<gen_img1>", "<gen_img2>"]},
             "block_qa": {"questions": [
                 {"subject": "<gen_text1>", "object": "<query_img1>", "relation": "describes",
                  "Question": "Does <gen_text1> describe this image?"},
                 {"subject": "<gen_img1>", "object": "<gen_img2>", "relation": "precedes",
                  "Question": "Does the first image come before the second?"},
                 {"subject": "<gen_text1>", "object": "<query_text1>", "relation": "answers",
                  "Question": "Does <gen_text1> answer <query_text1>?"},
                 {"subject": "<gen_img3>", "object": "<gen_img1>", "relation": "x", "Question": "Absent block?"}]},
             "image_qa": {"questions": [
                 {"image": "<gen_img1>", "Question": "Are there hands?", "id": 0, "Preliminary": []},
                 {"image": "<gen_img1>", "Question": "Are the hands wet?", "id": 1, "Preliminary": [0]},
                 {"image": "<gen_img2>", "Question": "Is there a towel?", "id": 2, "Preliminary": []}]}}},
        {"id": "0001", "Category": "Object_VQA",
         "Query": [{"type": "image", "content": "images/0001_q1.png"},
                   {"type": "text", "content": "What is this object?"}],
         "Golden": [{"type": "text", "content": "A yellow box."}],
         "predict": {"block_qa": {"questions": [
             {"subject": "<gen_text1>", "object": "<query_text1>", "relation": "answers",
              "Question": "Does <gen_text1> answer <query_text1>?"}]}}},
        {"id": "0002", "Category": "HowTo", "Query": [{"type": "image", "content": "/etc/passwd"}], "Golden": []},
    ]
    path = root / "ISG-Bench.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def isg_judge_reply(n: int, body: dict) -> str:
    """Known replies by question kind; what a well-behaved judge sends, in the shapes judges send."""
    text = " ".join(part.get("text", "") for part in body["messages"][-1]["content"])
    if "yes/no question" in text:
        return json.dumps({"Judge": "No" if "towel" in text else "Yes", "Reason": "."})
    if "overall score" in text:
        return json.dumps({"coherence": {"score": 6, "explanation": ""}, "overall_score": 7})
    if "Text 1" in text:
        return '{"Judge": "6", "Reason": "as a string"}'
    return '```json\n{"Judge": 8, "Reason": "fenced"}\n```'


def test_isg_reads_the_published_layout_and_rejects_a_path_outside(tmp_path: Path) -> None:
    items, rejected = isg.load_isg(make_isg(tmp_path))
    assert [item.id for item in items] == ["0000", "0001"] and len(rejected) == 1
    assert ":3:" in rejected[0] and "leaves the benchmark folder" in rejected[0]
    text, images = isg.query_message(items[1])
    assert text == "<image>\nWhat is this object?" and [p.name for p in images] == ["0001_q1.png"]


def test_isg_structure_and_block_names_follow_the_official_scorer(tmp_path: Path) -> None:
    items, _ = isg.load_isg(make_isg(tmp_path))
    text, image = isg.Block("text", "t"), isg.Block("image", tmp_path / "x.png")
    assert isg.structure_holds([text, image, image], items[0].golden)
    assert not isg.structure_holds([text, image], items[0].golden)
    assert not isg.structure_holds([image, text, image], items[0].golden)
    names = isg.named_blocks(items[0], [isg.Block("text", "a"), isg.Block("image", "p1"), isg.Block("image", "p2")])
    assert {k: v.content for k, v in names.items() if k.startswith("<gen")} == {
        "<gen_text1>": "a", "<gen_img1>": "p1", "<gen_img2>": "p2"}
    assert set(names) >= {"<query_text1>", "<query_img1>"}


def test_isg_answers_are_written_in_the_scorers_input_layout(tmp_path: Path) -> None:
    items, _ = isg.load_isg(make_isg(tmp_path))
    blocks = isg.answer_blocks(reply_with("Drying.", picture((1, 1, 1)), picture((2, 2, 2)), " "), tmp_path / "img",
                               "0000")
    assert [b["type"] for b in blocks] == ["text", "image", "image"]
    assert Path(blocks[1]["content"]).is_absolute() and Path(blocks[2]["content"]).name == "0000-o-2.png"


@pytest.mark.parametrize("dependencies, image_score, image_requests", [("released", 1 / 3, 2), ("dsg", 2 / 3, 3)])
def test_isg_levels_are_scored_as_the_official_scripts(tmp_path: Path, dependencies: str, image_score: float,
                                                       image_requests: int) -> None:
    items, _ = isg.load_isg(make_isg(tmp_path))
    prompts = isg.load_prompts()
    save_png(tmp_path / "o1.png", (1, 1, 1))
    save_png(tmp_path / "o2.png", (2, 2, 2))
    answers = {"0000": [isg.Block("text", "They dry off."), isg.Block("image", tmp_path / "o1.png"),
                        isg.Block("image", tmp_path / "o2.png")],
               "0001": [isg.Block("text", "A box.")]}
    with ChatServer(reply=isg_judge_reply) as server:
        results = {i.id: isg.judge_item(i, answers[i.id], _judge(server), prompts, dependencies) for i in items}
        asked = [" ".join(p.get("text", "") for p in r["messages"][-1]["content"]) for r in server.requests]
    assert sum("yes/no question" in text for text in asked) == image_requests
    assert all(not r["failures"] for r in results.values())
    scores = {key: isg.item_scores(answers[key], result) for key, result in results.items()}
    assert scores["0000"] == {"structure": True, "block": pytest.approx((8 + 8 + 6) / 3), "image": image_score,
                              "holistic": 7.0}
    assert scores["0001"] == {"structure": True, "block": 6.0, "image": 0.0, "holistic": 7.0}
    table = isg.summarize(items, scores)
    assert table["Temporal Prediction"]["image"] == pytest.approx(image_score)
    assert table["VQA"]["image"] is None  # no image questions: no image figure, as ISG's tables show "-"
    assert table["Average"]["image"] == pytest.approx(image_score)
    assert table["Average"]["block"] == pytest.approx(((8 + 8 + 6) / 3 + 6) / 2)
    # the text-image question goes image first, then the prompt; two images go both first
    text_image = next(r for r in server.requests if "describe this image" in json.dumps(r))
    assert [p["type"] for p in text_image["messages"][-1]["content"]] == ["image_url", "text"]


def test_isg_a_wrong_structure_scores_as_the_official_defaults(tmp_path: Path) -> None:
    items, _ = isg.load_isg(make_isg(tmp_path))
    answer = [isg.Block("text", "Only words.")]
    with ChatServer(reply=isg_judge_reply) as server:
        result = isg.judge_item(items[0], answer, _judge(server), isg.load_prompts())
        assert len(server.requests) == 1  # the holistic level alone is judged
    assert isg.item_scores(answer, result) == {"structure": False, "block": 1.0, "image": 0.0, "holistic": 7.0}
    assert isg.item_scores(None, None) == {"structure": False, "block": 1.0, "image": 0.0, "holistic": 1.0}


def test_isg_unreadable_judge_replies_are_failures_and_retried_next_run(tmp_path: Path) -> None:
    data = make_isg(tmp_path / "bench")

    class Responder:
        def respond(self, cases, seeds):
            return [reply_with("A yellow box.") for _ in cases]

    with ChatServer(reply=lambda n, body: "I would rather not say") as server:
        report = run_isg(data, Responder(), tmp_path / "out", _judge(server), max_items=None)
    assert report["answered"] == 2 and report["judge_failures_now"] > 0
    assert report["scores"]["VQA"]["holistic"] == 1.0  # unreadable: the scorer's default
    assert report["scores"]["Temporal Prediction"]["structure"] == 0.0
    with ChatServer(reply=isg_judge_reply) as server:
        again = run_isg(data, Responder(), tmp_path / "out", _judge(server))
    assert again["answered_now"] == 0 and again["judge_failures_now"] == 0
    assert again["scores"]["VQA"] == {"items": 1, "structure": 1.0, "block": 6.0, "image": None, "holistic": 7.0}
    judged = [json.loads(line) for line in (tmp_path / "out" / "isg" / "judged.jsonl").read_text().splitlines()]
    assert {"id", "Category", "Query", "Golden", "predict", "output", "result"} <= set(judged[-1])
    answers = [json.loads(line) for line in (tmp_path / "out" / "isg" / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["0000", "0001"] and answers[1]["output"] == [
        {"type": "text", "content": "A yellow box."}]


def test_isg_without_a_judge_scores_the_structure_only(tmp_path: Path) -> None:
    data = make_isg(tmp_path / "bench")

    class Responder:
        def respond(self, cases, seeds):
            return [reply_with("Drying.", picture((1, 1, 1)), picture((2, 2, 2))) for _ in cases]

    report = run_isg(data, Responder(), tmp_path / "out")
    assert report["scores"]["Temporal Prediction"] == {"items": 1, "structure": 1.0}
    assert report["scores"]["VQA"] == {"items": 1, "structure": 0.0}


@pytest.mark.slow
def test_mim_evaluate_runs_both_benchmarks_on_a_tiny_mim_with_a_loopback_judge(tmp_path: Path) -> None:
    from heads import LanguageDescriptionHead
    from mim import MIM
    from mim.cli import main
    from mim.modeling.directory import save_directory

    tiny = {"preset": "tiny"}
    torch.manual_seed(0)
    model_dir = save_directory(MIM(head=LanguageDescriptionHead(), llm=tiny, blip2=tiny), tmp_path / "mim", sdxl=tiny)
    opening_data, isg_data = make_opening(tmp_path / "o"), make_isg(tmp_path / "i")
    with ChatServer(reply=lambda n, body: ("A is better" if body.get("max_tokens") == 5
                                           else isg_judge_reply(n, body))) as server:
        with pytest.raises(SystemExit) as exit_code:
            main(["evaluate", str(model_dir), "[]", "--out_dir", str(tmp_path / "eval"), "--opening", str(opening_data),
                  "--isg", str(isg_data), "--judge_model", "judge", "--judge_base_url", server.url,
                  "--clip", "tiny", "--max_new_tokens", "6", "--max_images", "1", "--image_size", "64",
                  "--num_inference_steps", "2", "--image_bias", "8.0"])
    assert exit_code.value.code == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())["benchmarks"]
    assert report["OpenING"]["answered"] == 2 and report["OpenING"]["judged"] == 2
    assert report["OpenING"]["win_rates"]["force_divided_tie"]
    assert report["ISG-Bench"]["answered"] == 2 and "Average" in report["ISG-Bench"]["scores"]
    assert (tmp_path / "eval" / "benchmarks" / "opening" / "gen_outputs" / "MIM_output" / "0301001.json").is_file()
    assert (tmp_path / "eval" / "benchmarks" / "isg" / "answers.jsonl").is_file()


@pytest.mark.parametrize("flags, message", [
    ([], "nothing to score"),
    (["--opening", "missing.jsonl"], "is not a file"),
    (["--isg", "ISG-Bench.jsonl", "--isg_dependencies", "all"], "released' or 'dsg'"),
    (["--opening", "test_data.jsonl", "--model_name", "Human"], "not 'Human'"),
])
def test_mim_evaluate_refuses_a_bad_benchmark_request_before_loading_a_model(
        tmp_path: Path, monkeypatch, capsys, flags: list[str], message: str) -> None:
    from mim.evaluation.held_out import evaluate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_data.jsonl").write_text("")
    (tmp_path / "ISG-Bench.jsonl").write_text("")
    options = {flag.lstrip("-"): value for flag, value in zip(flags[::2], flags[1::2])}
    assert evaluate("no-such-model-dir", [], **options) == 2
    assert message in capsys.readouterr().err


def test_judge_prompts_from_a_folder_replace_ours_by_name(tmp_path: Path) -> None:
    """``--judge_prompts DIR``: a file of a prompt's name there (the official wording) is what the judge gets."""
    from mim.evaluation.interleaved.judge import judge_prompt

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "opening_pairwise.txt").write_text("OFFICIAL PAIRWISE WORDING")
    assert judge_prompt("opening_pairwise", tmp_path / "prompts") == "OFFICIAL PAIRWISE WORDING"
    assert judge_prompt("isg_image", tmp_path / "prompts") == judge_prompt("isg_image")  # no file: ours
    data = make_opening(tmp_path)

    class Responder:
        def respond(self, cases, seeds):
            return [reply_with("My answer.") for _ in cases]

    with ChatServer(reply=lambda n, body: "A is better") as server:
        run_opening(data, Responder(), tmp_path / "out", _judge(server), prompts_dir=tmp_path / "prompts",
                    max_items=1)
    assert server.requests[0]["messages"][0] == {"role": "system", "content": "OFFICIAL PAIRWISE WORDING"}
