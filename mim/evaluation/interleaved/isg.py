"""ISG-Bench (Chen et al., ICLR 2025): interleaved generation scored on four levels by an interleaved scene graph.

Published layout (github.com/Dongping-Chen/ISG, ``ISG_eval/``): ``ISG-Bench.jsonl``, one item per line with
``id``, ``Category``, ``Query`` and ``Golden`` (lists of ``{"type": "text"|"image", "content"}``, image paths
relative to the folder) and ``predict`` (the scene graph: ``structure``, ``block_qa.questions``,
``image_qa.questions``). A model's answers are the same lines with an ``output`` list of blocks (images as paths)
in one JSONL file: what ``ISG-eval.py --input_file`` reads.

Scoring is ``ISG-eval.py`` followed by ``calculate_performance.py``:

- **structure** (no judge): the answer's sequence of text/image blocks equals the golden answer's;
- **block** (judged, only where the structure holds): each ``block_qa`` question relates two blocks of the query
  or the answer (``<query_text1>``, ``<gen_img2>``, ...); a judge scores it 1-10 from the two blocks; an item's
  block score is the mean (1 where the structure fails or nothing could be scored);
- **image** (judged, only where the structure holds): each ``image_qa`` question asks yes/no about one generated
  image, asked only when every question it depends on (``Preliminary``) was answered yes; an item's image
  score is yes-answers / questions (0 where the structure fails);
- **holistic** (judged, always): the judge scores the whole answer 1-10 against the query and the golden answer
  (1 for an empty answer or an unreadable reply).

Each level is averaged per item within the eight categories ``calculate_performance.py`` groups the 21 task
types into; structure is the share of items whose structure holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mim.evaluation.interleaved.judge import Judge, JudgeReply, image_data_url, judge_prompt
from mim.evaluation.interleaved.records import BenchmarkFormatError, inside, read_benchmark
from synth.data.schema import IMAGE_PLACEHOLDER, escape_placeholders

#: ``calculate_performance.py``'s ``Sum_category``: the reported categories and the task types in each.
CATEGORIES = {
    "Style Transfer": ["Art Style Transfer", "Scene Attribute Transfer", "Photo Variation", "Portrait Variation"],
    "Progressive": ["Animation Images", "Animation Text-Image", "Attribute Transfer"],
    "3D Scene": ["3D_object", "multi-Perspective Scene Generation"],
    "Image Decomposition": ["Realistic Object Detection", "Imaginary Object Detection"],
    "Image-Text Complementation": ["HowTo", "Scientific"],
    "Temporal Prediction": ["Prediction", "painting"],
    "Visual Story Telling": ["visual storytelling text-image", "visual storytelling image", "visual storytelling text"],
    "VQA": ["Object_VQA", "Historical"],
}


@dataclass
class Block:
    type: str  # "text" or "image"
    content: str | Path  # the text, or the image's path


@dataclass
class ISGItem:
    id: str
    category: str
    record: dict  # the line as published, written back with the answer
    query: list[Block]
    golden: list[Block]


def _blocks(raw: Any, root: Path, where: str) -> list[Block]:
    if not isinstance(raw, list):
        raise BenchmarkFormatError(f"{where}: must be a list of blocks")
    blocks = []
    for number, block in enumerate(raw, 1):
        kind = block.get("type") if isinstance(block, dict) else None
        content = block.get("content") if isinstance(block, dict) else None
        if kind not in ("text", "image") or not isinstance(content, str):
            raise BenchmarkFormatError(f"{where} block {number}: a block is {{\"type\": \"text\"|\"image\", "
                                       "\"content\": str}")
        blocks.append(Block(kind, inside(root, content, f"{where} block {number}") if kind == "image" else content))
    return blocks


def load_isg(path: str | Path, root: str | Path | None = None) -> tuple[list[ISGItem], list[str]]:
    """(items, rejections) of ``ISG-Bench.jsonl``; a line that cannot be read is rejected with its line number
    and the rest load. Image paths resolve under ``root`` (default: the file's folder) and may not leave it."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent

    def build(item_id: str, record: dict, where: str) -> ISGItem:
        if not isinstance(record.get("predict", {}), dict):
            raise BenchmarkFormatError("predict must be an object")
        return ISGItem(item_id, str(record.get("Category", "")), record,
                       _blocks(record["Query"], root, where + " Query"),
                       _blocks(record["Golden"], root, where + " Golden"))

    return read_benchmark(path, "id", "[A-Za-z0-9_-]+", "letters, digits, '-' or '_'", build)


def query_message(item: ISGItem) -> tuple[str, list[Path]]:
    """The query as one user message for MIM: its texts in order, a placeholder where each image goes."""
    pieces, images = [], []
    for block in item.query:
        if block.type == "image":
            pieces.append(IMAGE_PLACEHOLDER)
            images.append(Path(block.content))
        else:
            pieces.append(escape_placeholders(str(block.content).strip()))
    return "\n".join(p for p in pieces if p), images


def answer_blocks(result, image_dir: str | Path, item_id: str) -> list[dict]:
    """A MIM reply as ISG output blocks: each run of text, each drawn image saved as ``<id>-o-<k>.png`` under
    ``image_dir`` and named by its absolute path (the official scorer opens the path as written)."""
    from mim.inference.interleaved import ImagePart

    image_dir = Path(image_dir)
    blocks, text, count = [], "", 0
    for part in result.parts:
        if isinstance(part, ImagePart):
            if text.strip():
                blocks.append({"type": "text", "content": text.strip()})
            text = ""
            count += 1
            image_dir.mkdir(parents=True, exist_ok=True)
            target = (image_dir / f"{item_id}-o-{count}.png").resolve()
            part.image.save(target, format="PNG")
            blocks.append({"type": "image", "content": str(target)})
        else:
            text += part.text
    if text.strip():
        blocks.append({"type": "text", "content": text.strip()})
    return blocks


def read_answers(path: str | Path) -> dict[str, list[Block]]:
    """id -> the answer's blocks, from an answers file in ISG's input layout (a cut or foreign line is
    skipped; a later line for the same id wins). Image paths are taken as written (absolute, or relative to
    the answers file's folder)."""
    path = Path(path)
    answers: dict[str, list[Block]] = {}
    if not path.is_file():
        return answers
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            output = record["output"]
            blocks = [Block(b["type"], path.parent / b["content"] if b["type"] == "image" else str(b["content"]))
                      for b in output if b.get("type") in ("text", "image")] if isinstance(output, list) else []
            answers[str(record["id"])] = blocks
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    return answers


# --- the levels ----------------------------------------------------------------------------------------

def structure_holds(answer: list[Block], golden: list[Block]) -> bool:
    """``evaluate_structure``: the same sequence of text and image blocks as the golden answer."""
    return [b.type for b in answer] == [b.type for b in golden]


def named_blocks(item: ISGItem, answer: list[Block]) -> dict[str, Block]:
    """``rename_content``: ``<gen_text1>``, ``<gen_img1>``, ... for the answer; ``<query_text1>``, ... for the query."""
    if item.golden and item.golden[0].type == "image" and answer and answer[0].type == "text":
        answer = answer[1:]  # as the script: a leading text before an image-first golden answer is dropped
    names: dict[str, Block] = {}
    for prefix, blocks in (("gen", answer), ("query", item.query)):
        counts = {"text": 0, "image": 0}
        for block in blocks:
            counts[block.type] += 1
            names[f"<{prefix}_{'text' if block.type == 'text' else 'img'}{counts[block.type]}>"] = block
    return names


def load_prompts(directory: str | Path | None = None) -> dict[str, str]:
    """The judge prompts, ours unless ``directory`` holds a file of the same name (the official wording, say)."""
    return {name: judge_prompt(name, directory)
            for name in ("isg_text_text", "isg_text_image", "isg_image_image", "isg_image", "isg_holistic")}


def _fill(template: str, **values: str) -> str:
    """``str.format`` that leaves other braces alone (a prompt may show a JSON example)."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], template)


def score_value(value: Any) -> float | None:
    """A judge's 1-10 score: a number, or a string holding one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", value)
        return float(match.group(1)) if match else None
    return None


def _image(block: Block) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_url(block.content), "detail": "low"}}


def block_questions(item: ISGItem, names: dict[str, Block], prompts: dict[str, str]) -> Iterator[tuple[dict, list]]:
    """(question, judge content) for each ``block_qa`` question whose two blocks exist, laid out as
    ``evaluate_block`` lays them out (two images: both, then the prompt; two texts: the prompt with both, the
    tags in the question replaced by ``Text 1``/``Text 2``; a text and an image: the image, then the prompt)."""
    block_qa = item.record.get("predict", {}).get("block_qa") or {}
    for question in block_qa.get("questions", []) if isinstance(block_qa, dict) else []:
        if not isinstance(question, dict) or not isinstance(question.get("Question"), str):
            continue
        subject, target = names.get(question.get("subject")), names.get(question.get("object"))
        if subject is None or target is None:
            continue
        text = question["Question"]
        if subject.type == "image" and target.type == "image":
            content = [_image(subject), _image(target),
                       {"type": "text", "text": _fill(prompts["isg_image_image"], question=text)}]
        elif subject.type == "text" and target.type == "text":
            text = text.replace(question["subject"], " `Text 1` ").replace(question["object"], " `Text 2` ")
            content = [{"type": "text", "text": _fill(prompts["isg_text_text"], text1=str(subject.content),
                                                      text2=str(target.content), question=text)}]
        else:
            written, picture = (subject, target) if subject.type == "text" else (target, subject)
            # ISG-eval.py replaces the text's *content* in the question (not its tag), which rarely occurs: kept
            text = text.replace(str(written.content), " `Text` ")
            content = [_image(picture), {"type": "text", "text": _fill(prompts["isg_text_image"],
                                                                       text=str(written.content), question=text)}]
        yield question, content


def image_questions(item: ISGItem) -> list[dict]:
    image_qa = item.record.get("predict", {}).get("image_qa")
    if isinstance(image_qa, dict):  # {"questions": [...]} (or another single key, as the script accepts)
        image_qa = next(iter(image_qa.values()), [])
    return [q for q in image_qa or [] if isinstance(q, dict)]


def holistic_content(item: ISGItem, answer: list[Block], prompt: str) -> list[dict]:
    """``evaluate_response(with_gt=True)``: the prompt's text around the query's, the answer's and the golden
    answer's blocks (``{query}``, ``{answer}``, ``{golden}`` mark where each goes); newlines in texts become spaces."""
    content: list[dict] = []
    for piece in re.split(r"(\{query\}|\{answer\}|\{golden\})", prompt):
        blocks = {"{query}": item.query, "{answer}": answer, "{golden}": item.golden}.get(piece)
        if blocks is None:
            if piece.strip():
                content.append({"type": "text", "text": piece.replace("\n", " ")})
            continue
        for block in blocks:
            content.append(_image(block) if block.type == "image"
                           else {"type": "text", "text": str(block.content).replace("\n", " ")})
    return content


def judge_item(item: ISGItem, answer: list[Block] | None, judge: Judge | None, prompts: dict[str, str],
               dependencies: str = "released") -> dict:
    """One item's ``result`` as ``ISG-eval.py`` records it (``structure``; ``block`` and ``image`` question lists
    with the judge's replies where the structure holds; ``holistic``), plus ``failures``: judge replies that could
    not be read. Without a judge, only the structure is scored.

    ``dependencies``: which image questions are asked. ``released``, as ``ISG-eval.py`` does: a question with any
    prerequisite is never asked (the script looks the prerequisite ids up among the block names, where they never
    are), so it counts as a "no"; figures comparable with the published ones. ``dsg``, as the paper describes
    (Davidsonian scene graphs): a question is asked when every prerequisite was answered yes."""
    if dependencies not in ("released", "dsg"):
        raise ValueError(f"dependencies must be 'released' or 'dsg', got {dependencies!r}")
    result: dict[str, Any] = {"structure": structure_holds(answer or [], item.golden), "failures": []}
    if judge is None or answer is None:
        return result

    def ask(content: list[dict], what: str) -> dict | None:
        try:
            reply = judge.ask(content, want_json=True)
        except (OSError, ValueError) as error:  # an image that cannot be read or sent
            reply = JudgeReply(None, f"{type(error).__name__}: {error}")
        parsed = reply.json()
        if parsed is None:
            result["failures"].append({"what": what, "error": reply.error or "the reply is not a JSON object",
                                       "reply": reply.text})
        return parsed

    if result["structure"]:
        names = named_blocks(item, answer)
        yes: dict[Any, bool] = {}
        image_results = []
        for question in image_questions(item):
            entry = dict(question)
            yes[question.get("id")] = False
            preliminary = question.get("Preliminary") or []
            askable = not preliminary if dependencies == "released" else all(yes.get(p) for p in preliminary)
            if askable and names.get(question.get("image"), Block("text", "")).type == "image":
                entry["judge"] = ask([_image(names[question["image"]]),
                                      {"type": "text", "text": _fill(prompts["isg_image"],
                                                                     question=str(question.get("Question", "")))}],
                                     f"image question {question.get('id')}")
                judged = (entry["judge"] or {}).get("Judge")
                yes[question.get("id")] = isinstance(judged, str) and judged.strip().lower() == "yes"
            image_results.append(entry)
        result["image"] = image_results
        block_results = []
        for question, content in block_questions(item, names, prompts):
            verdict = ask(content, f"block question {question['Question']!r}")
            block_results.append({**question, "VQA_judge_Score": verdict})
        result["block"] = block_results
    result["holistic"] = ask(holistic_content(item, answer, prompts["isg_holistic"]), "holistic")
    return result


def item_scores(answer: list[Block] | None, result: dict | None) -> dict[str, float | bool]:
    """One item's four figures as ``calculate_performance.analyze_data`` takes them from its result."""
    if answer is None or result is None:  # no answer: the script's defaults for an item without a result
        return {"structure": False, "block": 1.0, "image": 0.0, "holistic": 1.0}
    scores: dict[str, float | bool] = {"structure": bool(result["structure"]), "block": 1.0, "image": 0.0,
                                       "holistic": 1.0}
    if result["structure"]:
        judged = [score_value((q.get("VQA_judge_Score") or {}).get("Judge")) for q in result.get("block") or []]
        judged = [s for s in judged if s is not None]
        if judged:
            scores["block"] = sum(judged) / len(judged)
    questions = result.get("image") or []
    if questions:
        answered_yes = sum(1 for q in questions if isinstance((q.get("judge") or {}).get("Judge"), str)
                           and q["judge"]["Judge"].strip().lower() == "yes")
        scores["image"] = answered_yes / len(questions)
    overall = score_value((result.get("holistic") or {}).get("overall_score"))
    empty = not answer or (answer[0].type == "text" and not str(answer[0].content))
    if overall is not None and not empty:
        scores["holistic"] = overall
    return scores


def summarize(items: list[ISGItem], scores: dict[str, dict]) -> dict[str, dict[str, float | int | None]]:
    """``calculate_performance.print_statistics``: per category, the share of items whose structure holds and
    the mean block, image and holistic scores. A category none of whose items has image questions (VQA) has no
    image figure (the script prints 0; ISG's tables show "-"). ``Average`` is the mean over the categories
    present that have the figure, as ISG's tables average."""
    levels = ("structure", "block", "image", "holistic")
    table: dict[str, dict[str, float | int | None]] = {}
    for category, task_types in CATEGORIES.items():
        members = [item for item in items if item.category in task_types and item.id in scores]
        if not members:
            continue
        row: dict[str, float | int | None] = {"items": len(members)}
        for level in levels:
            row[level] = sum(float(scores[item.id][level]) for item in members) / len(members)
        if not any(image_questions(item) for item in members):
            row["image"] = None
        table[category] = row
    if table:
        average: dict[str, float | int | None] = {"items": sum(int(row["items"]) for row in table.values())}
        for level in levels:
            values = [float(row[level]) for row in table.values() if row[level] is not None]
            average[level] = sum(values) / len(values) if values else None
        table["Average"] = average
    return table
