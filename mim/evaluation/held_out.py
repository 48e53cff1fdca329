"""``mim evaluate``: one way to score any MIM (any head, or the converted release).

Held-out conversations are replayed turn by turn: for every assistant turn,
the model answers the user turn before it given the *reference* history (the
earlier turns as written, their images included), and its answer is scored
against the reference assistant turn:

- text: BLEU-4 and ROUGE-L (torchmetrics), distinct-1/2 and the paper's
  diversity score (section 4.3), length in words;
- when to draw: precision, recall and F1 of "this turn shows an image",
  against the reference; images per turn. A model that never (or always)
  draws shows up here at once;
- images: CLIP score against the reference caption and against the model's
  own description (language head), CLIP image similarity to the reference
  image, diversity across samples (``samples`` > 1) or across all images,
  the share of distinct SDXL conditions, and a Fréchet distance over CLIP
  image features (not Inception-FID; torchmetrics' FID too when InceptionV3
  weights are given locally);
- the benchmarks the release ships: MME and MMBench, from their official files.

Answers are written as they come (``answers.jsonl``, images under ``images/``),
so an interrupted run resumes and a rerun only scores. Rows are generated in
batches (:mod:`mim.inference.batched`). Outputs: ``eval.json``, ``eval.md``, PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from mim.evaluation.cases import Case, RecordError, admit, generate_isolated
from mim.inference.interleaved import GenerationResult, GenerationSettings, ImagePart, TextPart
from synth.data.schema import IMAGE_PLACEHOLDER, SchemaError


def safe_stem(text: str, limit: int = 80) -> str:
    """A file-name stem for any id: path-safe characters, at most ``limit`` of them, plus a checksum of the
    whole id so two ids never share a name (a 300-character id would exceed the file system's limit)."""
    import zlib

    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:limit] + f"-{zlib.crc32(text.encode()):08x}"


def read_message_lists(paths: Sequence[str], image_root: str | None = None, format: str = "auto"
                       ) -> tuple[list[tuple[str, Any, list[dict[str, Any]]]], list[str]]:
    """(file, conversation, its turns as ``{"role", "content", "images": [paths]}`` messages) for every
    readable conversation; and the problems met (bad records, image paths that leave their root).

    Ids are unique across the files of one run: a record whose id an earlier file already used (two files
    without ids, ``a/test.jsonl`` and ``b/test.jsonl``, both number theirs ``test-000000``) is renamed
    ``FILE::ID``, the same way on every rerun, and the renaming is reported."""
    from dataclasses import replace as replace_field

    from synth.data.conversation_io import read_conversations

    read: list[tuple[str, Any, list[dict[str, Any]]]] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for path in paths:
        conversations, report = read_conversations(path, on_error="skip", format=format)
        problems += [str(error) for error in report.rejected]
        root = image_root or str(Path(path).resolve().parent)
        renamed = 0
        for conversation in conversations:
            if conversation.id in seen and seen[conversation.id] != str(path):
                conversation = replace_field(conversation, id=f"{path}::{conversation.id}")
                renamed += 1
            seen.setdefault(conversation.id, str(path))
            try:
                messages = [{"role": turn.role, "content": turn.content,
                             "images": [str(conversation.image_path(name, root)) for name in turn.image_list]}
                            for turn in conversation.turns]
            except SchemaError as error:
                problems.append(f"{path} (record {conversation.id!r}): {error.detail}")
                continue
            read.append((path, conversation, messages))
        if renamed:
            problems.append(f"{path}: {renamed} record id(s) already used by an earlier file; renamed {path}::ID "
                            "(give records ids of their own to choose)")
    return read, problems


def replay_cases(paths: Sequence[str], image_root: str | None = None, format: str = "auto",
                 max_cases: int | None = None) -> tuple[list[Case], list[str]]:
    """Every assistant turn that follows a user turn, with its reference history; and the problems met."""
    cases: list[Case] = []
    read, problems = read_message_lists(paths, image_root, format)
    for path, conversation, messages in read:
        for index, (turn, message) in enumerate(zip(conversation.turns, messages)):
            if turn.role == "assistant" and index and messages[index - 1]["role"] == "user":
                keys = {a.get("turn"): a for a in (conversation.meta or {}).get("answers", []) if isinstance(a, dict)}
                cases.append(Case(f"{conversation.id}/{index}", conversation.id, index,
                                  messages[:index], turn.content, message["images"], list(turn.caption_list),
                                  keys.get(index)))
    return (cases[:max_cases] if max_cases is not None else cases), problems


class Responder(Protocol):
    """Answers cases; the model behind ``mim evaluate``, or a stand-in."""

    def respond(self, cases: list[Case], seeds: list[int]) -> list[GenerationResult]: ...


class ModelResponder:
    """A MIM with its SDXL: one batched generation per batch of cases."""

    def __init__(self, model, sdxl, refiner=None, settings: GenerationSettings | None = None,
                 blank_images: bool = False) -> None:
        from mim.inference.batched import BatchedGenerator
        from mim.inference.interleaved import InterleavedGenerator

        self.generator = InterleavedGenerator(model, sdxl, refiner)
        self.batched = BatchedGenerator(self.generator)
        self.settings = settings or GenerationSettings()
        self.blank_images = blank_images  # the language-prior control: every picture grey, same count

    def respond(self, cases: list[Case], seeds: list[int]) -> list[GenerationResult | RecordError]:
        """One result per case; a case that does not fit the model or whose images do not decode is its own
        :class:`RecordError`, and the others are answered in one batch."""
        from dataclasses import replace

        settings = [replace(self.settings, seed=seed) for seed in seeds]
        outcomes: list[Any] = [None] * len(cases)
        admitted = []
        for index, case in enumerate(cases):
            try:
                messages = admit(case.messages, self.generator, settings[index])
                admitted.append((index, blanked(messages) if self.blank_images else messages))
            except RecordError as error:
                outcomes[index] = RecordError(f"record {case.record_id!r} turn {case.turn}: {error}")
        results = generate_isolated(self.batched.generate, [messages for _, messages in admitted],
                                    [settings[index] for index, _ in admitted]) if admitted else []
        for (index, _), result in zip(admitted, results):
            outcomes[index] = result
        return outcomes


def blanked(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same messages with every picture replaced by a grey one of its size: what a model answers from
    its language prior alone. A model that reads the pictures falls to chance here."""
    from PIL import Image

    return [{**m, "images": [Image.new("RGB", image.size, (128, 128, 128)) for image in m.get("images", [])]}
            for m in messages]


class ReferenceResponder:
    """Answers with the reference turn itself: scores that must come out perfect (a check of the scoring)."""

    def respond(self, cases: list[Case], seeds: list[int]) -> list[GenerationResult]:
        from synth.data.images import decode_image_file

        results = []
        for case in cases:
            pieces = case.reference_text.split(IMAGE_PLACEHOLDER)
            result = GenerationResult()
            for index, piece in enumerate(pieces):
                if piece:
                    result.parts.append(TextPart(piece))
                if index < len(case.reference_images):
                    caption = case.reference_captions[index] if index < len(case.reference_captions) else None
                    result.parts.append(ImagePart(decode_image_file(case.reference_images[index]), caption, "prompt"))
            results.append(result)
        return results


def condition_fingerprint(condition) -> str:
    """What SDXL was asked for: the prompt, or a hash of the whole embedding tensors (rounded), so two
    different captions never share a fingerprint (the first token alone is BOS for every caption)."""
    if condition.prompt is not None:
        return "prompt:" + condition.prompt
    digest = hashlib.sha1()
    for tensor in (condition.prompt_embeds, condition.pooled_prompt_embeds):
        digest.update(tensor.detach().float().cpu().numpy().round(4).tobytes())
    return "embeddings:" + digest.hexdigest()


# --- answers, written as they come -----------------------------------------------------------------

class AnswerStore:
    """``answers.jsonl`` plus the images; a rerun skips what was answered and retries what failed (a fixed
    image is then scored). A last line cut short by a kill is removed before anything is appended."""

    def __init__(self, out_dir: Path) -> None:
        from synth.generation.generate import read_done

        self.out_dir = out_dir
        self.path = out_dir / "answers.jsonl"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        self.records: dict[tuple[str, int], dict] = {}
        read_done(self.path, key="key")  # trims a cut last line
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    key = (record["key"], record["sample"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if record.get("error") is None:
                    self.records[key] = record

    def add(self, case: Case, sample: int, result: GenerationResult | None, seconds: float,
            error: str | None = None) -> None:
        images, descriptions, kinds, fingerprints = [], [], [], []
        if result is not None:
            safe = safe_stem(case.key)
            for index, part in enumerate(p for p in result.parts if isinstance(p, ImagePart)):
                name = f"{safe}__s{sample}__{index}.png"
                part.image.save(self.out_dir / "images" / name)
                images.append(name)
                descriptions.append(part.caption)
                kinds.append(part.condition)
            fingerprints = [condition_fingerprint(c) for c in result.conditions]
        # the pooled embedding an MSE head asked SDXL for (None for a prompt): conditioning-space metrics
        pooled = [None if c.pooled_prompt_embeds is None else
                  [round(float(v), 5) for v in c.pooled_prompt_embeds.reshape(-1).tolist()]
                  for c in (result.conditions if result is not None else [])]
        record = {"key": case.key, "sample": sample, "text": result.text if result is not None else "",
                  "images": images, "descriptions": descriptions, "conditions": kinds, "fingerprints": fingerprints,
                  "pooled": pooled,
                  "seconds": round(seconds, 3), "error": error}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records[(case.key, sample)] = record


def answer_cases(cases: list[Case], responder: Responder, store: AnswerStore, samples: int = 1, seed: int = 0,
                 batch_size: int = 8) -> int:
    """Answer every (case, sample) not yet stored; return how many were answered now."""
    todo = [(case, sample) for case in cases for sample in range(samples) if (case.key, sample) not in store.records]
    with tqdm(total=len(cases) * samples, initial=len(cases) * samples - len(todo), desc="evaluate",
              unit="turn") as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            began = time.perf_counter()
            outcomes = generate_isolated(responder.respond, [case for case, _ in batch],
                                         [seed + sample for _, sample in batch])
            seconds = (time.perf_counter() - began) / len(batch)
            for (case, sample), outcome in zip(batch, outcomes):
                if isinstance(outcome, RecordError):  # recorded, counted, and retried by the next run
                    store.add(case, sample, None, seconds, str(outcome))
                else:
                    store.add(case, sample, outcome, seconds)
            progress.update(len(batch))
    return len(todo)


# --- scoring -------------------------------------------------------------------------------------------

def _plain(text: str) -> str:
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())


def _distinct(texts: list[str], n: int) -> float | None:
    grams = [tuple(words[i:i + n]) for words in (t.lower().split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def text_metrics(pairs: list[tuple[Case, dict]]) -> dict[str, Any]:
    from torchmetrics.text import BLEUScore, ROUGEScore

    from synth.statistics.stats import diversity

    generated = [_plain(answer["text"]) for _, answer in pairs]
    references = [_plain(case.reference_text) for case, _ in pairs]
    bleu = float(BLEUScore(n_gram=4)(generated, [[r] for r in references])) if pairs else None
    rouge = float(ROUGEScore(rouge_keys="rougeL")(generated, references)["rougeL_fmeasure"]) if pairs else None
    return {"bleu4": bleu, "rougeL": rouge, "distinct1": _distinct(generated, 1), "distinct2": _distinct(generated, 2),
            "diversity": diversity(generated) if generated else None,
            "words_generated": sum(len(t.split()) for t in generated) / max(1, len(generated)),
            "words_reference": sum(len(t.split()) for t in references) / max(1, len(references))}


def chosen_answer(text: str, choices: list[str]) -> str | None:
    """The choice a reply gives: the one whose word comes first in it (None if it names none)."""
    import re

    found = [(match.start(), choice) for choice in choices
             for match in [re.search(rf"\b{re.escape(choice)}\b", text.lower())] if match]
    return min(found)[1] if found else None


def _answer_rows(pairs: list[tuple[Case, dict]]) -> list[tuple[Case, bool, float]]:
    """Each keyed turn: whether its reply chose the key's answer, and the chance of guessing it."""
    rows = []
    for case, answer in pairs:
        key = case.answer
        if key and key.get("choices"):
            right = chosen_answer(answer["text"], [str(c) for c in key["choices"]]) == str(key["answer"])
            rows.append((case, right, 1 / len(key["choices"])))
    return rows


def answer_correctness(pairs: list[tuple[Case, dict]]) -> dict[str, bool]:
    """Whether each keyed turn (by case key) was answered right: what a paired test of two runs compares."""
    return {case.key: right for case, right, _ in _answer_rows(pairs)}


def answer_metrics(pairs: list[tuple[Case, dict]]) -> dict[str, Any] | None:
    """Accuracy on turns whose record has an answer key (``meta.answers``: ``turn``, ``type``, ``answer``,
    ``choices``), by question type, next to chance (one over the number of choices) and the exact p-value of
    doing that well by guessing (``p_chance``). None when no turn has a key. Any dataset with such keys can
    use it (the world's conversations have them)."""
    from mim.evaluation.significance import above_chance_p

    by_type: dict[str, list[tuple[bool, float]]] = {}
    for case, right, chance in _answer_rows(pairs):
        by_type.setdefault(str(case.answer.get("type", "answer")), []).append((right, chance))
    if not by_type:
        return None
    by_type["all"] = [row for rows in by_type.values() for row in rows]

    def row(rows: list[tuple[bool, float]]) -> dict[str, Any]:
        rights, chances = [r for r, _ in rows], [c for _, c in rows]
        return {"accuracy": sum(rights) / len(rows), "chance": sum(chances) / len(rows), "turns": len(rows),
                "p_chance": above_chance_p(rights, chances)}

    return {kind: row(by_type[kind]) for kind in [*sorted(k for k in by_type if k != "all"), "all"]}


def drawing_metrics(pairs: list[tuple[Case, dict]]) -> dict[str, Any]:
    """Whether the model shows an image where the reference does."""
    tp = sum(bool(a["images"]) and bool(c.reference_images) for c, a in pairs)
    fp = sum(bool(a["images"]) and not c.reference_images for c, a in pairs)
    fn = sum(not a["images"] and bool(c.reference_images) for c, a in pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if tp + fp and tp + fn
                                                                                    else None)
    return {"precision": precision, "recall": recall, "f1": f1, "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, "turns": len(pairs),
            "turns_with_image_generated": sum(bool(a["images"]) for _, a in pairs) / max(1, len(pairs)),
            "turns_with_image_reference": sum(bool(c.reference_images) for c, _ in pairs) / max(1, len(pairs)),
            "images_per_turn_generated": sum(len(a["images"]) for _, a in pairs) / max(1, len(pairs)),
            "images_per_turn_reference": sum(len(c.reference_images) for c, _ in pairs) / max(1, len(pairs))}


def image_metrics(pairs: list[tuple[Case, dict]], out_dir: Path, clip, inception_weights: str | None = None
                  ) -> dict[str, Any]:
    from PIL import Image

    from mim.evaluation.clip_metrics import ClipMetrics, frechet_distance, pairwise_distance

    metrics = ClipMetrics(clip)
    with_caption, captions, with_description, descriptions = [], [], [], []
    compared, references, generated_all, reference_all = [], [], [], []
    by_case: dict[str, list] = {}
    fingerprints: dict[str, list[str]] = {}
    for case, answer in pairs:
        for index, name in enumerate(answer["images"]):
            image = Image.open(out_dir / "images" / name).convert("RGB")
            generated_all.append(image)
            if index == 0:
                by_case.setdefault(case.key, []).append(image)
            if index < len(case.reference_captions) and case.reference_captions[index]:
                with_caption.append(image)
                captions.append(case.reference_captions[index])
            description = answer["descriptions"][index] if index < len(answer["descriptions"]) else None
            if description:
                with_description.append(image)
                descriptions.append(description)
            if index < len(case.reference_images) and Path(case.reference_images[index]).is_file():
                compared.append(image)
                references.append(Image.open(case.reference_images[index]).convert("RGB"))
        if answer["fingerprints"]:
            fingerprints.setdefault(case.key, []).append(answer["fingerprints"][0])
        for path in case.reference_images:
            if Path(path).is_file() and answer["sample"] == 0:
                reference_all.append(Image.open(path).convert("RGB"))
    multi = {key: images for key, images in by_case.items() if len(images) > 1}
    diversity = [pairwise_distance(metrics.image_features(images)) for images in multi.values()]
    diversity = [d for d in diversity if d is not None]
    distinct = [len(set(prints)) / len(prints) for prints in fingerprints.values() if len(prints) > 1]
    generated_features, reference_features = metrics.image_features(generated_all), metrics.image_features(reference_all)
    result = {
        "images_generated": len(generated_all), "images_reference": len(reference_all),
        "clip_score_reference_caption": metrics.clip_score(with_caption, captions),
        "clip_score_own_description": metrics.clip_score(with_description, descriptions),
        "clip_image_similarity_to_reference": metrics.image_similarity(compared, references),
        "image_diversity": (sum(diversity) / len(diversity)) if diversity else pairwise_distance(generated_features),
        "image_diversity_over": "samples of one turn" if diversity else "all generated images",
        "distinct_conditions": (sum(distinct) / len(distinct)) if distinct else None,
        "clip_frechet_distance": frechet_distance(generated_features, reference_features),
        "inception_fid": None,
    }
    if inception_weights:
        result["inception_fid"] = _inception_fid(generated_all, reference_all, inception_weights)
    return result


def _inception_fid(generated: list, reference: list, weights: str) -> float | None:
    """torchmetrics' FID with InceptionV3 weights from a local file (needs the torch-fidelity package)."""
    import numpy as np
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(generated) < 2 or len(reference) < 2:
        return None
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    for images, real in ((reference, True), (generated, False)):
        batch = torch.stack([torch.from_numpy(np.asarray(image.resize((299, 299)))).permute(2, 0, 1)
                             for image in images])
        metric.update(batch, real=real)
    return float(metric.compute())


# --- the benchmarks ------------------------------------------------------------------------------------

def answer_benchmark(items, generate: Callable[[list], list[str]], path: Path, batch_size: int = 8) -> dict[str, str]:
    """Answers to benchmark items, written as they come to ``path`` (JSONL); a rerun skips what is there."""
    done: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["key"]] = record["prediction"]
            except (json.JSONDecodeError, KeyError):
                continue
    todo = [item for item in items if item.key not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=path.stem, unit="question") as progress, \
            open(path, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for item, prediction in zip(batch, generate(batch)):
                done[item.key] = prediction
                handle.write(json.dumps({"key": item.key, "prediction": prediction}, ensure_ascii=False) + "\n")
            handle.flush()
            progress.update(len(batch))
    return done


def benchmark_generate(responder: ModelResponder, max_new_tokens: int) -> Callable[[list], list[str]]:
    """Greedy text answers, no image drawn, as the release answered benchmark questions."""
    from dataclasses import replace

    from mim.evaluation.mme_mmbench import as_image

    settings = replace(responder.settings, do_sample=False, max_images=0, max_new_tokens=max_new_tokens)

    def generate(items) -> list[str]:
        conversations = [[{"role": "user", "content": item.prompt, "images": [as_image(item.image)]}] for item in items]
        return [r.text for r in responder.batched.generate(conversations, [settings] * len(items))]

    return generate


# --- the report --------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    lines = ["# Evaluation", ""] + [f"> {note}" for note in report["notes"]] + [""]
    answers = report.get("answers")
    if answers:
        lines += ["## answers (turns with an answer key)", "",
                  "| type | accuracy | chance | turns | p (as good by guessing) |", "|---|---|---|---|---|"]
        lines += [f"| {kind} | {row['accuracy']:.3f} | {row['chance']:.3f} | {row['turns']} | "
                  f"{row['p_chance']:.2g} |" for kind, row in answers.items()]
        lines.append("")
    for section in ("text", "drawing", "images"):
        values = report.get(section) or {}
        lines += [f"## {section}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in values.items()]
        lines.append("")
    for name, scores in report.get("benchmarks", {}).items():
        lines += [f"## {name}", "", "```", json.dumps(scores, indent=1), "```", ""]
    (out_dir / "eval.md").write_text("\n".join(lines))
    drawing = report["drawing"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    names = ["precision", "recall", "f1"]
    left.bar(names, [drawing[n] or 0 for n in names])
    left.set_ylim(0, 1)
    left.set_title("When to draw an image")
    right.bar(["generated", "reference"], [drawing["images_per_turn_generated"], drawing["images_per_turn_reference"]])
    right.set_title("Images per turn")
    figure.tight_layout()
    figure.savefig(out_dir / "drawing.png")
    plt.close(figure)
    images = report.get("images")
    if images:
        figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
        names = ["clip_score_reference_caption", "clip_score_own_description", "clip_image_similarity_to_reference"]
        axis.bar(["vs caption", "vs own description", "vs reference image"], [images[n] or 0 for n in names])
        axis.set_title("CLIP scores")
        figure.tight_layout()
        figure.savefig(out_dir / "clip.png")
        plt.close(figure)


def evaluate_cases(cases: list[Case], responder: Responder, out_dir: str | Path, clip=None, samples: int = 1,
                   seed: int = 0, batch_size: int = 8, inception_weights: str | None = None,
                   notes: Sequence[str] = (), benchmarks: dict[str, Any] | None = None,
                   settings: dict[str, Any] | None = None,
                   metrics: dict[str, Callable[[list[tuple[Case, dict]]], Any]] | None = None) -> dict[str, Any]:
    """Answer (resumably) and score ``cases``; write eval.json, eval.md and the plots; return the report.
    ``metrics``: more figures, each computed from the (case, answer) pairs that were answered, kept in the
    report (and eval.json) under its name."""
    out_dir = Path(out_dir)
    store = AnswerStore(out_dir)
    answered = answer_cases(cases, responder, store, samples, seed, batch_size)
    pairs = [(case, store.records[(case.key, s)]) for case in cases for s in range(samples)
             if (case.key, s) in store.records]
    failed = [answer for _, answer in pairs if answer["error"]]
    pairs = [(case, answer) for case, answer in pairs if not answer["error"]]
    report: dict[str, Any] = {
        "settings": settings or {}, "cases": len(cases), "samples": samples, "answered_now": answered,
        "failed": len(failed), "failures": [a["error"] for a in failed[:10]], "notes": list(notes),
        "text": text_metrics(pairs), "answers": answer_metrics(pairs), "drawing": drawing_metrics(pairs),
        "images": image_metrics(pairs, out_dir, clip, inception_weights) if clip is not None else None,
        "benchmarks": benchmarks or {},
        "seconds_per_turn": sum(a["seconds"] for _, a in pairs) / max(1, len(pairs)),
        **{name: metric(pairs) for name, metric in (metrics or {}).items()},
    }
    report["notes"].append("Fréchet distance is over CLIP image features, not Inception-FID"
                           + (" (inception_fid: torchmetrics' FID with the given InceptionV3 weights)"
                              if inception_weights else " (give --inception_weights for torchmetrics' FID)"))
    write_report(report, out_dir)
    return report


def evaluate(model: str, data: str | list[str], out_dir: str = "runs/eval", image_root: str | None = None,
             format: str = "auto", sdxl: dict | str | None = None, refiner: dict | str | None = None,
             clip: dict | str | None = None, samples: int = 1, batch_size: int = 8, max_cases: int | None = None,
             device: str | None = None, dtype: str | None = None, max_new_tokens: int = 256, max_images: int = 2,
             image_size: int = 1024, num_inference_steps: int = 40, guidance_scale: float = 5.0,
             do_sample: bool = False, top_p: float = 0.9, seed: int = 0, image_bias: float = 0.0,
             mme: str | None = None,
             mmbench: str | None = None, benchmark_max_new_tokens: int = 16,
             inception_weights: str | None = None, trust_remote_code: bool = False,
             blank_images: bool = False, opening: str | None = None, opening_opponents: dict[str, str] | None = None,
             opening_battles: int = 1, isg: str | None = None, isg_root: str | None = None,
             isg_dependencies: str = "released", model_name: str = "MIM", benchmark_max_items: int | None = None,
             judge_model: str | None = None, judge_base_url: str | None = None,
             judge_api_key_env: str = "OPENAI_API_KEY", judge_prompts: str | None = None,
             judge_json_mode: bool = False) -> int:
    """Score a MIM (a directory from ``mim export``/``mim convert``, or a .ckpt) on held-out conversations.

    Args:
        model: MIM directory or Lightning checkpoint.
        data: a conversation file, or a list of them (``'[a.jsonl,b.json]'``; any schema format) to replay, turn by
            turn, with the reference history; ``'[]'`` for none, to run only the benchmarks.
        out_dir: where answers, images and the report (eval.json, eval.md, *.png) go; a rerun resumes.
        image_root: where the files' image paths resolve (default: each file's folder).
        format: the files' format (auto: TextBind or LLaVA).
        sdxl: the SDXL that draws (default: recorded in the directory, else SDXL base 1.0).
        refiner: an SDXL refiner.
        clip: the CLIP for image metrics (default openai/clip-vit-large-patch14).
        samples: answers per turn (> 1 measures diversity across samples; needs do_sample).
        batch_size: turns generated together.
        max_cases: score only the first this many turns.
        device: cuda or cpu.
        dtype: float16 or bfloat16 on GPUs.
        max_new_tokens: tokens per answer.
        max_images: images per answer.
        image_size: SDXL image size.
        num_inference_steps: SDXL steps.
        guidance_scale: SDXL guidance.
        do_sample: top-p sampling instead of greedy.
        top_p: nucleus mass.
        seed: sample k of a turn uses seed + k.
        image_bias: added to the image trigger's logit (a model that never draws can still be probed).
        mme: an MME release folder (MME_Benchmark_release_version) to run and score.
        mmbench: an MMBench TSV to run and score.
        benchmark_max_new_tokens: tokens per benchmark answer.
        inception_weights: InceptionV3 weights (pt_inception-2015-12-05 .pth) for torchmetrics' FID.
        trust_remote_code: let the model's own sources run their Python code (a mim.json or checkpoint that
            asks for ``trust_remote_code``); refused without it. Only for models you trust.
        blank_images: the language-prior control: every user picture replaced by a grey one (answers with
            an answer key should then fall to chance if the model answers from the pictures).
        opening: OpenING's data file (``OpenING-benchmark/test_data.jsonl``, images beside it): answered into
            ``OUT/opening/gen_outputs/MODEL_output`` and, with a judge, judged pairwise against the human
            reference (win rates the four ways OpenING reports them).
        opening_opponents: other models' OpenING answer folders to battle too (``'{NAME: DIR}'``, e.g. the
            folders under OpenING's ``gen_outputs``).
        opening_battles: judged pairs per OpenING instance.
        isg: ISG-Bench's ``ISG-Bench.jsonl``: answered into ``OUT/isg/answers.jsonl`` (ISG-eval.py's input
            layout); the structure level is scored without a judge, block, image and holistic with one.
        isg_root: where ISG-Bench's image paths resolve (default: the file's folder).
        isg_dependencies: ``released`` asks image questions as ISG-eval.py does (none with prerequisites),
            comparable with published figures; ``dsg`` asks those whose prerequisites were answered yes.
        model_name: the model's name in the benchmarks' files (``MODEL_output``).
        benchmark_max_items: answer only the first this many items of each interleaved benchmark.
        judge_model: the judge's model name at an OpenAI-compatible endpoint (gpt-4o, or a local vLLM model).
        judge_base_url: the judge's endpoint (default OpenAI's).
        judge_api_key_env: the environment variable holding the judge's key (read from nowhere else).
        judge_prompts: a folder whose ``opening_pairwise.txt`` / ``isg_*.txt`` replace ours (the official wording).
        judge_json_mode: ask the judge for JSON with ``response_format`` (ISG's scorer does; not every server can).
    """
    from mim.evaluation.mme_mmbench import load_mmbench, load_mme, score_mmbench, score_mme, write_mme_results
    from mim.inference.chat import MIMChat
    from mim.inference.interleaved import trigger_bias
    from synth.model_parts import build_clip

    data = [data] if isinstance(data, str) else list(data)
    if not (data or mme or mmbench or opening or isg):
        print("mim evaluate: nothing to score: give conversation files (DATA), or DATA '[]' with --mme, --mmbench, "
              "--opening or --isg", file=sys.stderr)
        return 2
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # before minutes of model loading
        print(f"mim evaluate: out_dir {out_dir} is a file, not a folder; choose another", file=sys.stderr)
        return 2
    for name, path in (("opening", opening), ("isg", isg)):
        if path is not None and not Path(path).is_file():
            print(f"mim evaluate: --{name} {path} is not a file (the benchmark's data file)", file=sys.stderr)
            return 2
    judge = None
    try:
        if opening:
            from mim.evaluation.interleaved.opening import check_model_name

            check_model_name(model_name)
        if isg_dependencies not in ("released", "dsg"):
            raise ValueError(f"--isg_dependencies must be 'released' or 'dsg', got {isg_dependencies!r}")
    except ValueError as error:
        print(f"mim evaluate: {error}", file=sys.stderr)
        return 2
    if judge_model is not None:
        from mim.evaluation.interleaved.judge import Judge

        try:
            judge = Judge(judge_model, judge_base_url, judge_api_key_env, json_mode=judge_json_mode)
        except ValueError as error:
            print(f"mim evaluate: {error}", file=sys.stderr)
            return 2
    loaded = MIMChat.from_pretrained(model, sdxl=sdxl, refiner=refiner, device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, max_images=max_images, image_size=image_size,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  do_sample=do_sample, top_p=top_p, seed=seed,
                                  logit_bias=trigger_bias(loaded.generator.model.head, image_bias))
    generator = loaded.generator
    responder = ModelResponder(generator.model, generator.sdxl, generator.refiner, settings, blank_images)
    clip_bundle = build_clip(clip or "openai/clip-vit-large-patch14")
    out = Path(out_dir)
    notes = []
    hparams = dict(generator.model.hparams)
    if any((hparams.get(part) or {}).get("preset") for part in ("llm", "blip2")):
        notes.append("computed with tiny random-weight models: the numbers show the machinery works, not quality")
    if blank_images:
        notes.append("language-prior control: every user picture was replaced by a grey one (--blank_images)")
    benchmarks: dict[str, Any] = {}
    if mme:
        items = load_mme(mme)
        answers = answer_benchmark(items, benchmark_generate(responder, benchmark_max_new_tokens),
                                   out / "benchmarks" / "mme_answers.jsonl", batch_size)
        write_mme_results(items, answers, out / "benchmarks" / "mme_results")
        benchmarks["MME"] = score_mme(items, answers)
    if mmbench:
        items = load_mmbench(mmbench)
        answers = answer_benchmark(items, benchmark_generate(responder, benchmark_max_new_tokens),
                                   out / "benchmarks" / "mmbench_answers.jsonl", batch_size)
        benchmarks["MMBench"] = score_mmbench(items, answers)
    if opening or isg:
        from mim.evaluation.interleaved.runner import run_isg, run_opening

        benchmark_dir = out / "benchmarks"
        if opening:
            benchmarks["OpenING"] = run_opening(opening, responder, benchmark_dir, judge, model_name,
                                                opening_opponents, opening_battles, judge_prompts,
                                                benchmark_max_items, batch_size, seed)
        if isg:
            benchmarks["ISG-Bench"] = run_isg(isg, responder, benchmark_dir, judge, isg_root, judge_prompts,
                                              isg_dependencies, benchmark_max_items, batch_size, seed)
    cases, problems = replay_cases(data, image_root, format, max_cases)
    if problems:
        notes.append(f"{len(problems)} record(s) could not be replayed; first: {problems[0]}")
    report = evaluate_cases(cases, responder, out, clip_bundle, samples, seed, batch_size, inception_weights, notes,
                            benchmarks, settings={"model": model, "data": list(data), **settings.__dict__})
    print(f"evaluation: {out / 'eval.md'} ({report['cases']} turns, {report['failed']} failed)")
    return 0
