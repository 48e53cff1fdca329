"""mim evaluate: replaying held-out turns, every metric, known answers, and the benchmarks' scoring."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from heads import LanguageDescriptionHead
from mim import MIM
from mim.evaluation.held_out import ReferenceResponder, condition_fingerprint, evaluate, evaluate_cases, replay_cases
from mim.modeling.directory import save_directory
from synth.samples import CONVERSATIONS_FILE, sample_image_dir
from synth.model_parts import build_clip

TINY = {"preset": "tiny"}


def sample_cases():
    cases, problems = replay_cases([str(CONVERSATIONS_FILE)], image_root=str(sample_image_dir()))
    assert problems == []
    return cases


def test_replay_takes_the_reference_history_before_each_assistant_turn() -> None:
    cases = sample_cases()
    records = [json.loads(line) for line in CONVERSATIONS_FILE.read_text().splitlines()]
    expected = sum(turn["role"] == "assistant" and index > 0 and r["conversation"][index - 1]["role"] == "user"
                   for r in records for index, turn in enumerate(r["conversation"]))
    assert len(cases) == expected == len({c.key for c in cases}) > 0
    for case in cases:
        assert case.messages[-1]["role"] == "user"
        assert case.reference_text.count("<image>") == len(case.reference_images)
    later = next(c for c in cases if c.turn > 1)
    assert len(later.messages) == later.turn and later.messages[-2]["role"] == "assistant"


def test_the_reference_answering_itself_scores_perfectly(tmp_path: Path) -> None:
    cases = sample_cases()
    report = evaluate_cases(cases, ReferenceResponder(), tmp_path, clip=build_clip("tiny"))
    assert report["text"]["bleu4"] == pytest.approx(1.0) and report["text"]["rougeL"] == pytest.approx(1.0)
    drawing = report["drawing"]
    assert drawing["true_positives"] > 0
    assert (drawing["precision"], drawing["recall"], drawing["f1"]) == (1.0, 1.0, 1.0)
    assert drawing["images_per_turn_generated"] == drawing["images_per_turn_reference"]
    assert report["images"]["clip_image_similarity_to_reference"] == pytest.approx(100.0, abs=1e-3)
    assert report["images"]["clip_frechet_distance"] == pytest.approx(0.0, abs=1e-6)


def test_a_model_that_never_draws_gets_zero_recall(tmp_path: Path) -> None:
    from mim.inference.interleaved import GenerationResult, TextPart

    class Silent:
        def respond(self, cases, seeds):
            return [GenerationResult([TextPart(case.reference_text.replace("<image>", ""))]) for case in cases]

    report = evaluate_cases(sample_cases(), Silent(), tmp_path)
    assert report["drawing"]["recall"] == 0.0 and report["drawing"]["precision"] is None
    # the words are the reference's: text metrics are perfect, and only the drawing metrics see the difference
    assert report["images"] is None and report["text"]["bleu4"] == pytest.approx(1.0)


@pytest.mark.slow
def test_evaluate_on_the_tiny_model_writes_every_metric_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_dir = save_directory(MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY), tmp_path / "mim",
                               sdxl=TINY)
    common = dict(data=[str(CONVERSATIONS_FILE)], image_root=str(sample_image_dir()), out_dir=str(tmp_path / "eval"),
                  clip=TINY, samples=2, do_sample=True, batch_size=4, max_new_tokens=12, max_images=1, image_size=64,
                  num_inference_steps=2, image_bias=8.0, max_cases=4)
    assert evaluate(str(model_dir), **common) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["cases"] == 4 and report["answered_now"] == 8 and report["failed"] == 0
    for section in ("text", "drawing", "images"):
        missing = [k for k, v in report[section].items() if v is None and k != "inception_fid"]
        assert not missing, (section, missing)
    assert report["images"]["image_diversity_over"] == "samples of one turn"
    assert any("tiny random-weight" in note for note in report["notes"])
    assert {p.name for p in (tmp_path / "eval").glob("*.png")} == {"drawing.png", "clip.png"}
    assert "| bleu4 |" in (tmp_path / "eval" / "eval.md").read_text()
    assert evaluate(str(model_dir), **common) == 0  # a rerun answers nothing again, only scores
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["answered_now"] == 0


def test_the_condition_fingerprint_tells_captions_apart(tmp_path: Path) -> None:
    """Reading the first 64 values (the BOS token of prompt_embeds) made every caption look the same."""
    from heads import SDXLTargetCache
    from heads.base import SDXLCondition

    cache = SDXLTargetCache(tmp_path, TINY)
    captions = ["a red bus on a street", "a cat asleep on a sofa"]
    cache.compute(captions)
    targets = cache.load(captions)
    conditions = [SDXLCondition(prompt_embeds=targets["prompt_embeds"][i:i + 1],
                                pooled_prompt_embeds=targets["pooled_prompt_embeds"][i:i + 1]) for i in range(2)]
    first = [tuple(c.prompt_embeds.flatten()[:64].tolist()) for c in conditions]
    assert first[0] == first[1]  # the old fingerprint: identical
    assert condition_fingerprint(conditions[0]) != condition_fingerprint(conditions[1])
    assert condition_fingerprint(conditions[0]) == condition_fingerprint(conditions[0])


# --- the benchmarks ---------------------------------------------------------------------------------

def png(color) -> Image.Image:
    return Image.new("RGB", (16, 16), color)


def make_mme(root: Path) -> None:
    """Two subtasks in both of MME's layouts, two questions per image."""
    existence = root / "existence"
    (existence / "images").mkdir(parents=True)
    (existence / "questions_answers_YN").mkdir()
    for name, (first, second) in {"001": ("Yes", "No"), "002": ("No", "Yes")}.items():
        png((int(name), 0, 0)).save(existence / "images" / f"{name}.jpg")
        (existence / "questions_answers_YN" / f"{name}.txt").write_text(
            f"Is there a dog in the image?\t{first}\nIs there a cat in the image?\t{second}\n")
    code = root / "code_reasoning"
    code.mkdir()
    png((0, 9, 9)).save(code / "0001.png")
    (code / "0001.txt").write_text("Does the code print 3?\tYes\nDoes the code print 4?\tNo\n")
    (root / "eval_tool").mkdir()


def test_mme_is_scored_as_its_official_tool(tmp_path: Path) -> None:
    from mim.evaluation.mme_mmbench import load_mme, mme_label, score_mme, write_mme_results

    make_mme(tmp_path / "MME")
    items = load_mme(tmp_path / "MME")
    existence = [item for item in items if item.meta["task"] == "existence"]
    assert len(items) == 6 and existence[0].prompt == "<image> Is there a dog in the image?"
    assert [mme_label(a) for a in ["Yes.", "no", "Yes, there is", "I think not", "Nope"]] == [
        "yes", "no", "yes", "other", "no"]
    right = {item.key: item.answer for item in items}
    perfect = score_mme(items, right)
    assert perfect["tasks"]["existence"]["score"] == 200 and perfect["perception_score"] == 200
    assert perfect["cognition_score"] == 200
    # one wrong answer on image 001: accuracy 3/4, accuracy+ 1/2 -> 125
    wrong = dict(right, **{existence[0].key: "Sorry, I cannot tell"})
    assert score_mme(items, wrong)["tasks"]["existence"]["score"] == pytest.approx(125.0)
    write_mme_results(items, wrong, tmp_path / "results")
    lines = (tmp_path / "results" / "existence.txt").read_text().splitlines()
    assert lines[0] == "001.jpg\tIs there a dog in the image?\tYes\tSorry, I cannot tell"


def make_mmbench(path: Path) -> None:
    buffer = io.BytesIO()
    png((5, 5, 5)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = [  # question 7 and its circular variant (the options rotated), question 8 once
        (7, "What colour is it?", "", "red", "green", "blue", "A", "colour", "attribute"),
        (1000007, "What colour is it?", "", "green", "blue", "red", "C", "colour", "attribute"),
        (8, "How many?", "Count carefully.", "one", "two", "three", "B", "count", "perception"),
    ]
    header = "index\tquestion\thint\tA\tB\tC\tanswer\tcategory\tl2-category\timage\n"
    path.write_text(header + "".join("\t".join(map(str, row)) + f"\t{image}\n" for row in rows))


def test_mmbench_is_scored_with_circular_eval(tmp_path: Path) -> None:
    from mim.evaluation.mme_mmbench import load_mmbench, mmbench_choice, score_mmbench

    make_mmbench(tmp_path / "mmbench.tsv")
    items = load_mmbench(tmp_path / "mmbench.tsv")
    assert items[2].prompt == ("<image> Count carefully. How many? There are several options:\n"
                               "A. one\nB. two\nC. three\n")
    options = items[0].meta["options"]
    assert mmbench_choice("A", options) == "A" and mmbench_choice("The answer is (C).", options) == "C"
    assert mmbench_choice("It is green, clearly.", options) == "B"  # the text of one option
    assert mmbench_choice("A bright shade of something", options) is None  # "A" as an article
    assert mmbench_choice("red or green", options) is None
    right = score_mmbench(items, {items[0].key: "A", items[1].key: "C", items[2].key: "two"})
    assert right["accuracy"] == 1.0 and right["groups"] == 2 and right["circular"]
    half = score_mmbench(items, {items[0].key: "A", items[1].key: "A", items[2].key: "B"})
    assert half["accuracy"] == 0.5 and half["by_category"] == {"colour": 0.0, "count": 1.0}
    unmatched = score_mmbench(items, {items[0].key: "no idea", items[1].key: "C", items[2].key: "B"})
    assert unmatched["unmatched_answers"] == 1 and unmatched["accuracy"] == 0.5


def test_benchmark_answers_are_written_as_they_come_and_resumed(tmp_path: Path) -> None:
    from mim.evaluation.mme_mmbench import load_mme
    from mim.evaluation.held_out import answer_benchmark

    make_mme(tmp_path / "MME")
    items = load_mme(tmp_path / "MME")
    asked = []

    def generate(batch):
        asked.extend(item.key for item in batch)
        return [item.answer for item in batch]

    answer_benchmark(items[:3], generate, tmp_path / "answers.jsonl", batch_size=2)
    answers = answer_benchmark(items, generate, tmp_path / "answers.jsonl", batch_size=2)
    assert sorted(asked) == sorted(item.key for item in items)  # each asked once
    assert answers == {item.key: item.answer for item in items}


def _official_mme_scores(results: Path) -> dict[str, float]:
    """MME's eval_tool/calculation.py, its reading and scoring steps as published (``readlines``, pairs of
    lines per image, ``split("\\t")``, ``lower()``, ``parse_pred_ans``, 100 x (acc + acc+))."""

    def parse_pred_ans(pred_ans):
        if pred_ans in ["yes", "no"]:
            return pred_ans
        prefix_pred_ans = pred_ans[:4]
        if "yes" in prefix_pred_ans:
            return "yes"
        if "no" in prefix_pred_ans:
            return "no"
        return "other"

    scores = {}
    for task_txt in sorted(results.glob("*.txt")):
        lines = open(task_txt, "r").readlines()
        chunk_lines = list(zip(lines[0::2], lines[1::2]))
        gts, preds, img_correct_num = [], [], 0
        for img_items in chunk_lines:
            img_correct = 0
            for img_item in img_items:
                img_name, question, gt_ans, pred_ans = img_item.split("\t")
                gt_ans, pred_ans = gt_ans.lower(), pred_ans.lower()
                pred_ans = parse_pred_ans(pred_ans)
                gts.append(gt_ans)
                preds.append(pred_ans)
                img_correct += gt_ans == pred_ans
            img_correct_num += img_correct == 2
        accuracy = sum(g == p for g, p in zip(gts, preds)) / len(gts)
        scores[task_txt.stem] = 100 * (accuracy + img_correct_num / len(chunk_lines))
    return scores


ADVERSARIAL_ANSWERS = ["  yes", "\n\nYes", "\tno", " \r\nNO.", "yes", "No", "Yes, there is", "I think not",
                       "  nope", "", " ", "y e s", "\u2028yes", "\x85no", "ye\ns", "n\to", "YES\n", "   no way",
                       "nonsense", "\n\n\n\nyes"]


@pytest.mark.parametrize("answer", ADVERSARIAL_ANSWERS)
def test_mme_score_equals_the_official_tool_on_the_written_files(tmp_path: Path, answer: str) -> None:
    from mim.evaluation.mme_mmbench import load_mme, score_mme, write_mme_results

    make_mme(tmp_path / "MME")
    items = load_mme(tmp_path / "MME")
    # the adversarial answer on every other question, the right answer elsewhere
    predictions = {item.key: answer if index % 2 else item.answer for index, item in enumerate(items)}
    write_mme_results(items, predictions, tmp_path / "results")
    ours = score_mme(items, predictions)["tasks"]
    official = _official_mme_scores(tmp_path / "results")
    assert {task: ours[task]["score"] for task in official} == pytest.approx(official)


def test_mme_score_equals_the_official_tool_for_any_answer(tmp_path_factory) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mim.evaluation.mme_mmbench import load_mme, score_mme, write_mme_results

    root = tmp_path_factory.mktemp("mme")
    make_mme(root / "MME")
    items = load_mme(root / "MME")
    text = st.text(st.characters(codec="utf-8"), max_size=12)
    answers = st.one_of(text, st.builds(lambda a, b, c: a + b + c, text, st.sampled_from(["yes", "no", "Yes", "NO"]),
                                        text))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(answers, min_size=len(items), max_size=len(items)))
    def check(answer_list):
        predictions = {item.key: answer for item, answer in zip(items, answer_list)}
        out = root / "results"
        write_mme_results(items, predictions, out)
        ours = score_mme(items, predictions)["tasks"]
        official = _official_mme_scores(out)
        assert {task: ours[task]["score"] for task in official} == pytest.approx(official)

    check()
