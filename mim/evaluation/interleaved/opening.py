"""OpenING (Zhou et al., CVPR 2025): open-ended interleaved generation, judged pairwise.

Published layout (github.com/LanceZPF/OpenING): ``OpenING-benchmark/test_data.jsonl`` (and ``dev_data.jsonl``),
one instance per line: ``total_uid``, ``meta_task_*``, ``subtask_*``, ``data_id``, ``conversations: [{"input":
[steps]}, {"output": [steps]}]``, each step ``{"text", "image"}`` with the image path relative to the benchmark
folder and ``<image>`` in the text where it goes; the ``output`` is the human-written reference. A model's answers
go to ``gen_outputs/<MODEL>_output/<uid>.json`` in the same shape (``total_uid`` dropped: the file name carries
it), its images beside them as ``<uid>-o-<k>.jpg``: that is what the benchmark's own judge scripts read.

Scoring is OpenING's: a judge sees the input and two models' outputs and names the better one, its reply parsed
as ``GPT_judge_AB.py`` parses it (``A``/``B`` first, ``Tie(A)``/``Tie(B)``), and win rates are computed the four
ways ``calculate_model_winrate.py`` computes them. The human reference of each instance is the model ``Human``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim.evaluation.interleaved.judge import Judge, image_data_url, judge_prompt
from mim.evaluation.interleaved.records import BenchmarkFormatError, inside, read_benchmark
from synth.atomic import atomic_write_text
from synth.data.schema import IMAGE_PLACEHOLDER, escape_placeholders

HUMAN = "Human"
JUDGE_IMAGE_SIZE = (512, 512)  # GPT_judge_AB.encode_image resizes every image to this before sending it


@dataclass
class Step:
    text: str
    image: Path | None = None


@dataclass
class OpenINGInstance:
    uid: str
    record: dict  # the line as published, written back beside the answer
    inputs: list[Step]
    reference: list[Step] = field(default_factory=list)  # the human-annotated output


def _steps(raw: Any, root: Path, where: str) -> list[Step]:
    if not isinstance(raw, list):
        raise BenchmarkFormatError(f"{where}: steps must be a list")
    steps = []
    for number, step in enumerate(raw, 1):
        if not isinstance(step, dict) or not isinstance(step.get("text") or "", str):
            raise BenchmarkFormatError(f"{where} step {number}: a step is {{\"text\": str, \"image\": path}}")
        steps.append(Step(step.get("text") or "", inside(root, step.get("image"), f"{where} step {number}")))
    return steps


def _turn(record: dict, key: str) -> list | None:
    return next((turn[key] for turn in record["conversations"] if isinstance(turn, dict) and key in turn), None)


def check_model_name(name: str) -> str:
    """The name a model's answers are filed under (``<MODEL>_output``): a plain word, and not the reference's."""
    if name == HUMAN or not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"model_name {name!r}: letters, digits, '-', '_' and '.', and not {HUMAN!r} (the reference)")
    return name


def load_opening(path: str | Path, root: str | Path | None = None) -> tuple[list[OpenINGInstance], list[str]]:
    """(instances, rejections) of an OpenING data file; a line that cannot be read is rejected with its line
    number and the rest load. Image paths resolve under ``root`` (default: the file's folder) and may not leave it."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent

    def build(uid: str, record: dict, where: str) -> OpenINGInstance:
        inputs = _turn(record, "input")
        if inputs is None:
            raise BenchmarkFormatError("no conversations[].input")
        return OpenINGInstance(uid, record, _steps(inputs, root, where + " input"),
                               _steps(_turn(record, "output") or [], root, where + " output"))

    return read_benchmark(path, "total_uid", "[A-Za-z0-9]+", "letters and digits", build)


def instance_message(instance: OpenINGInstance) -> tuple[str, list[Path]]:
    """The instance's input as one user message for MIM: its texts, ``<BEGIN>`` dropped, with a placeholder
    where each step's image goes (its ``<image>`` mark, else after its text)."""
    pieces, images = [], []
    for step in instance.inputs:
        text = step.text.replace("<BEGIN>", "").strip()
        if step.image is not None:
            before, mark, after = text.partition("<image>")
            after = after.replace("<image>", "")
            text = (escape_placeholders(before) + IMAGE_PLACEHOLDER + escape_placeholders(after) if mark
                    else escape_placeholders(text) + " " + IMAGE_PLACEHOLDER).strip()
            images.append(step.image)
        else:
            text = escape_placeholders(text.replace("<image>", "").strip())
        pieces.append(text)
    return "\n".join(p for p in pieces if p), images


def answer_steps(result) -> list[tuple[str, Any]]:
    """A MIM reply as OpenING steps: each run of text with the image drawn after it (or None)."""
    from mim.inference.interleaved import ImagePart

    steps, text = [], ""
    for part in result.parts:
        if isinstance(part, ImagePart):
            steps.append((text.strip(), part.image))
            text = ""
        else:
            text += part.text
    if text.strip() or not steps:
        steps.append((text.strip(), None))
    return steps


def write_opening_answer(instance: OpenINGInstance, result, out_dir: str | Path) -> Path:
    """``out_dir/<uid>.json`` in OpenING's output layout, the images beside it as ``<uid>-o-<k>.jpg``; the
    JSON is written last, so a file that exists is a whole answer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = []
    for index, (text, image) in enumerate(answer_steps(result)):
        name = None
        if image is not None:
            name = f"{instance.uid}-o-{index}.jpg"
            image.convert("RGB").save(out_dir / name, format="JPEG", quality=95)
        output.append({"text": text, "image": name})
    record = {k: v for k, v in instance.record.items() if k not in ("conversations", "total_uid")}
    record["conversations"] = [{"input": _turn(instance.record, "input")}, {"output": output}]
    target = out_dir / f"{instance.uid}.json"
    atomic_write_text(target, json.dumps(record, ensure_ascii=False, indent=2))
    return target


def read_answer(out_dir: str | Path, uid: str) -> list[Step] | None:
    """A model's answer to ``uid`` from its ``<MODEL>_output`` folder (None when it has none). Images are looked
    up beside the answer by file name, as the official judge does."""
    out_dir = Path(out_dir)
    path = out_dir / f"{uid}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    output = _turn(record, "output") or []
    if not isinstance(output, list):
        raise BenchmarkFormatError(f"{path}: conversations[].output must be a list")
    steps = []
    for number, step in enumerate(output, 1):
        if not isinstance(step, dict):
            raise BenchmarkFormatError(f"{path} step {number}: a step is {{\"text\": str, \"image\": path}}")
        image = step.get("image")
        name = Path(image).name if isinstance(image, str) and image else None
        steps.append(Step(str(step.get("text") or ""),
                          out_dir / name if name and (out_dir / name).is_file() else None))
    return steps


# --- judging -------------------------------------------------------------------------------------------

def judge_content(instance: OpenINGInstance, answer_a: list[Step], answer_b: list[Step]) -> list[dict]:
    """The judge's user message, laid out as ``GPT_judge_AB.py`` lays it out.

    The input's steps, then output A's, then output B's; each step is its text (stripped, ``<BEGIN>`` and
    ``<image>`` removed) followed by its image. An image is tagged ``<IMG_k></IMG_k>`` at the end of its step's
    text, k counting across input, A and B, and is sent as a 512 x 512 JPEG. The first text of each part is
    prefixed ``<INPUT>: ``, ``<OUTPUT_A>: `` and ``\\n<OUTPUT_B>: ``; an empty first text becomes
    ``\\n<OUTPUT_A>:``. The message ends with the script's question."""
    content: list[dict] = []
    tags = 0
    for label, steps in (("<INPUT>", instance.inputs), ("<OUTPUT_A>", answer_a), ("<OUTPUT_B>", answer_b)):
        texts = []
        for step in steps:
            text = step.text.strip().replace("<BEGIN>", "").replace("<image>", "")
            if step.image is not None:
                text += f" <IMG_{tags}></IMG_{tags}>"
                tags += 1
            texts.append(text)
        if texts and texts[0]:
            texts[0] = {"<INPUT>": "", "<OUTPUT_A>": "", "<OUTPUT_B>": "\n"}[label] + f"{label}: {texts[0]}"
        elif texts:
            texts[0] = f"\n{label}:"
        else:
            texts.append(f"\n{label}:")
        for index, text in enumerate(texts):
            content.append({"type": "text", "text": text})
            image = steps[index].image if index < len(steps) else None
            if image is not None:
                content.append({"type": "image_url",
                                "image_url": {"url": image_data_url(image, resize=JUDGE_IMAGE_SIZE)}})
    content.append({"type": "text", "text": "\nPlease only output which model is better: "})
    return content


def parse_winner(reply: str, rng: random.Random) -> str:
    """A judge's reply as OpenING reads it: ``A`` or ``B`` first; ``tie...`` -> ``Tie(A)``/``Tie(B)`` as
    written; otherwise a tie leaning to the first ``A`` or ``B`` in the reply, else a random side."""
    if reply[:1] in ("A", "B"):
        return reply[0]
    if reply[:3].lower() == "tie":
        return reply[:5] + ")"
    for char in reply:
        if char in ("A", "B"):
            return f"Tie({char})"
    return f"Tie({rng.choice('AB')})"


def sample_battles(instances: list[OpenINGInstance], models: dict[str, str | Path | None], per_instance: int = 1,
                   seed: int = 0) -> list[dict]:
    """Pairs to judge: for each instance, ``per_instance`` pairs of models that answered it, each pair's order
    random (OpenING's ``data_instance_modelAB.json`` shape). ``models`` maps name -> its output folder (None for
    the human reference). OpenING's ``sampling_battles_pairs.py`` assigns pairs round-robin within a subtask;
    here every pair that includes the first model (the one evaluated) comes first, so a small budget compares it."""
    rng = random.Random(seed)
    ids = {name: str(index) for index, name in enumerate(models)}
    names = list(models)
    battles = []
    for instance in instances:
        present = [name for name in names
                   if models[name] is None or (Path(models[name]) / f"{instance.uid}.json").is_file()]
        pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
        first = [pair for pair in pairs if names[0] in pair]
        rest = [pair for pair in pairs if names[0] not in pair]
        rng.shuffle(first)
        rng.shuffle(rest)
        for a, b in (first + rest)[:per_instance]:
            if rng.random() < 0.5:
                a, b = b, a
            battles.append({"data_id": instance.uid, "model_A": {"id": ids[a], "name": a},
                            "model_B": {"id": ids[b], "name": b}})
    return battles


def judge_battles(battles: list[dict], instances: list[OpenINGInstance], models: dict[str, str | Path | None],
                  judge: Judge, results_path: str | Path, prompt: str | None = None, seed: int = 0) -> list[dict]:
    """Judge each battle; results (OpenING's ``[{data_id, model_A, model_B, winner}]``, plus the judge's
    ``reply``) are written after each one, so a rerun skips what is judged. A battle the judge could not answer,
    or whose answer files cannot be read, is recorded in ``<results>.failures.jsonl`` and asked again next run."""
    from tqdm import tqdm

    results_path = Path(results_path)
    system = prompt if prompt is not None else judge_prompt("opening_pairwise")
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else []
    done = {(r["data_id"], r["model_A"]["name"], r["model_B"]["name"]) for r in results}
    by_uid = {i.uid: i for i in instances}
    rng = random.Random(seed)
    failures = results_path.with_name(results_path.stem + ".failures.jsonl")
    for battle in tqdm(battles, desc="OpenING judge", unit="pair"):
        key = (battle["data_id"], battle["model_A"]["name"], battle["model_B"]["name"])
        if key in done:
            continue
        instance = by_uid[battle["data_id"]]
        try:
            answers = [instance.reference if models[name] is None else read_answer(models[name], instance.uid)
                       for name in key[1:]]
            reply = judge.ask(judge_content(instance, *answers), system=system, max_tokens=5)
            error = reply.error if reply.text is None else (None if reply.text.strip() else "an empty reply")
        except (OSError, ValueError, json.JSONDecodeError) as failure:  # an unreadable answer or image
            reply, error = None, f"{type(failure).__name__}: {failure}"
        if error is not None:
            with open(failures, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**battle, "error": error}) + "\n")
            continue
        results.append({**battle, "winner": parse_winner(reply.text.strip(), rng), "reply": reply.text})
        done.add(key)
        atomic_write_text(results_path, json.dumps(results, ensure_ascii=False, indent=2))
    return results


# --- win rates ------------------------------------------------------------------------------------------

def win_rates(results: list[dict]) -> dict[str, dict[str, float]]:
    """Each model's overall win rate, the four ways ``calculate_model_winrate.py`` reports it:

    - ``force_divided_tie`` (FDT, ``tie2ABdiv``, the headline metric): ``Tie(A)`` is A's win, ``Tie(B)`` B's;
    - ``without_tie``: ties dropped;
    - ``tie_as_loss`` (``with_tie``): ties count as played, not won;
    - ``tie_as_half`` (``with_tie_equaldiv``): a tie is half a win.
    """
    methods = ("force_divided_tie", "without_tie", "tie_as_loss", "tie_as_half")
    wins = {m: defaultdict(float) for m in methods}
    played = {m: defaultdict(int) for m in methods}
    for result in results:
        a, b, winner = result["model_A"]["name"], result["model_B"]["name"], result["winner"]
        decisive = winner in ("A", "B")
        for method in methods:
            if method == "without_tie" and not decisive:
                continue
            played[method][a] += 1
            played[method][b] += 1
        if decisive:
            side = a if winner == "A" else b
            for method in methods:
                wins[method][side] += 1
        elif "Tie" in winner:
            wins["tie_as_half"][a] += 0.5
            wins["tie_as_half"][b] += 0.5
            if winner in ("Tie(A)", "Tie(B)"):
                wins["force_divided_tie"][a if winner == "Tie(A)" else b] += 1
    return {method: {model: wins[method][model] / count for model, count in sorted(played[method].items())}
            for method in methods}
