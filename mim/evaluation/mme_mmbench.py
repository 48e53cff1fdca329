"""The benchmarks the release evaluated on, read from their official local files and scored as their scripts do.

MME (``MME_Benchmark_release_version/``): yes/no questions, two per image, in
14 subtasks. Layout, prompt and results files as the release's
``mme_evaluation.py`` (the prompt is ``"<image> {question}"``, answered
greedily); scoring as MME's official ``eval_tool/calculation.py``: an answer is
``yes``/``no`` if it is exactly that word or its first four characters contain
it (else "other", which counts as wrong); a subtask's score is 100 x
(accuracy + accuracy+), accuracy+ being the share of images with both
answers right; Perception sums 10 subtasks (max 2000), Cognition 4 (max 800).

MMBench (``mmbench_*.tsv``, images in base64): single-choice questions. The
prompt is the release's (``mmbench_evaluation.py``: hint, question, then
"There are several options:" and one line per option). Scoring as the
official rule-based matcher (VLMEvalKit ``can_infer``): an answer names one
option letter (punctuation stripped; an "A" in a reply longer than three
words may be an article and is not taken), or contains the text of exactly
one option; anything else is unmatched (the official pipeline would then ask
ChatGPT, which is not reached from here: the count is reported). Questions
whose index differs by multiples of 1,000,000 are circular variants of one
question, which is right only if every variant is (CircularEval).
"""

from __future__ import annotations

import base64
import csv
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MME_TASKS = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}


@dataclass
class BenchmarkItem:
    key: str
    prompt: str  # with one <image>
    image: Any  # a path or a PIL image
    answer: str | None
    meta: dict


# --- MME ----------------------------------------------------------------------------------------

def load_mme(root: str | os.PathLike[str]) -> list[BenchmarkItem]:
    """Every question of an MME release folder, in file order (two per image), as mme_evaluation.py reads it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not an MME folder (MME_Benchmark_release_version)")
    items = []
    for task in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "eval_tool"):
        image_dir = root / task
        if task == "artwork":
            image_dir = image_dir / "images" / "toy_dataset"
        elif (image_dir / "images").is_dir():
            image_dir = image_dir / "images"
        question_dir = root / task
        if (question_dir / "questions_answers_YN").is_dir():
            question_dir = question_dir / "questions_answers_YN"
        for text_file in sorted(question_dir.glob("*.txt")):
            stem = text_file.stem
            image = next((image_dir / f"{stem}{suffix}" for suffix in (".jpg", ".png")
                          if (image_dir / f"{stem}{suffix}").is_file()), image_dir / f"{stem}.png")
            for number, line in enumerate(text_file.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                question, answer = (line.split("\t") + [""])[:2]
                items.append(BenchmarkItem(f"mme/{task}/{stem}/{number}", f"<image> {question.strip()}", image,
                                           answer.strip(), {"task": task, "image_name": image.name,
                                                            "question": question.strip()}))
    if not items:
        raise FileNotFoundError(f"{root}: no MME question files (TASK/*.txt or TASK/questions_answers_YN/*.txt)")
    return items


def mme_label(answer: str) -> str:
    """MME's calculation.py ``parse_pred_ans``, after its lower-casing."""
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_written_prediction(answer: str) -> str:
    """The answer as a results line holds it: whitespace runs (tabs and line breaks included, which would
    break the tab-separated line) collapsed to one space, the ends stripped."""
    return " ".join(answer.split())


def score_mme(items: list[BenchmarkItem], predictions: dict[str, str]) -> dict[str, Any]:
    """Per-subtask accuracy, accuracy+ and score, and the Perception / Cognition totals.

    Each answer is scored as MME's calculation.py reads it back from :func:`write_mme_results`' file: the
    written prediction with the line's newline still on it (``readlines``), so the score here and the
    official tool's on the written files agree for any answer string."""
    by_task: dict[str, list[BenchmarkItem]] = defaultdict(list)
    for item in items:
        by_task[item.meta["task"]].append(item)
    tasks = {}
    for task, task_items in by_task.items():
        correct, images = 0, defaultdict(list)
        for item in task_items:
            written = mme_written_prediction(predictions.get(item.key, "")) + "\n"
            right = mme_label(written) == item.answer.lower()
            correct += right
            images[item.meta["image_name"]].append(right)
        accuracy = correct / len(task_items)
        accuracy_plus = sum(all(v) for v in images.values()) / len(images)
        tasks[task] = {"questions": len(task_items), "accuracy": accuracy, "accuracy_plus": accuracy_plus,
                       "score": 100 * (accuracy + accuracy_plus)}
    totals = {group: sum(tasks[t]["score"] for t in names if t in tasks) for group, names in MME_TASKS.items()}
    return {"tasks": tasks, **{f"{group.lower()}_score": value for group, value in totals.items()}}


def write_mme_results(items: list[BenchmarkItem], predictions: dict[str, str], out_dir: Path) -> None:
    """``<task>.txt`` lines "image<TAB>question<TAB>answer<TAB>prediction", for MME's own calculation.py."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[str]] = defaultdict(list)
    for item in items:
        prediction = mme_written_prediction(predictions.get(item.key, ""))
        by_task[item.meta["task"]].append(
            f"{item.meta['image_name']}\t{item.meta['question']}\t{item.answer}\t{prediction}\n")
    for task, lines in by_task.items():
        (out_dir / f"{task}.txt").write_text("".join(lines), encoding="utf-8")


# --- MMBench -------------------------------------------------------------------------------------

def load_mmbench(tsv: str | os.PathLike[str], sys_prompt: str = "There are several options:") -> list[BenchmarkItem]:
    """The questions of an MMBench TSV, prompts built as mmbench_evaluation.py builds them."""
    from synth.data.images import decode_image

    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    items = []
    with open(tsv, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            options = {letter: row[letter] for letter in "ABCDE" if row.get(letter) not in (None, "", "nan")}
            prompt = f"{sys_prompt}\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
            hint = row.get("hint")
            question = f"{hint} {row['question']} {prompt}" if hint not in (None, "", "nan") else \
                f"{row['question']} {prompt}"
            image = decode_image(base64.b64decode(row["image"]), name=f"{tsv} index {row['index']}")
            items.append(BenchmarkItem(f"mmbench/{row['index']}", f"<image> {question}", image,
                                       row.get("answer") or None,
                                       {"index": int(row["index"]), "options": options,
                                        "category": row.get("category"), "l2-category": row.get("l2-category")}))
    return items


_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names (VLMEvalKit's ``can_infer``: option letter, then option text); None if unmatched;
    "Z" for a refusal."""
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    cleaned = answer
    for char in ".()[],:;!*#{}":
        cleaned = cleaned.replace(char, " ")
    words = cleaned.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        if "A" in words and len(words) > 3:  # "A" may be an article
            return None
        return named[0]
    if not named and "Z" in words:
        return "Z"
    lowered = answer.lower()
    containing = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return containing[0] if len(containing) == 1 else None


def score_mmbench(items: list[BenchmarkItem], predictions: dict[str, str]) -> dict[str, Any]:
    """Accuracy with CircularEval, per category and l2-category; unmatched answers counted."""
    groups: dict[int, list[bool]] = defaultdict(list)
    meta: dict[int, BenchmarkItem] = {}
    unmatched = 0
    for item in items:
        if item.answer is None:
            continue
        choice = mmbench_choice(predictions.get(item.key, ""), item.meta["options"])
        unmatched += choice is None
        group = item.meta["index"] % 1_000_000
        groups[group].append(choice == item.answer)
        meta.setdefault(group, item)
    if not groups:
        return {"questions": 0, "note": "no answers in the file (a test split): submit predictions instead"}
    correct = {group: all(results) for group, results in groups.items()}

    def accuracy_by(key: str) -> dict[str, float]:
        buckets: dict[str, list[bool]] = defaultdict(list)
        for group, right in correct.items():
            buckets[str(meta[group].meta.get(key))].append(right)
        return {name: sum(values) / len(values) for name, values in sorted(buckets.items())}

    return {"questions": sum(len(v) for v in groups.values()), "groups": len(groups),
            "circular": any(len(v) > 1 for v in groups.values()),
            "accuracy": sum(correct.values()) / len(correct), "unmatched_answers": unmatched,
            "by_category": accuracy_by("category"), "by_l2_category": accuracy_by("l2-category")}


def as_image(image) -> Any:
    """A benchmark item's image as a decoded RGB PIL image."""
    from synth.data.images import decode_image_file

    if isinstance(image, (str, os.PathLike)):
        return decode_image_file(image)
    return image

